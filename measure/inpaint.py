"""What a masked edit leaves outside its mask, against the input image's own VAE round trip.

    python -m measure.inpaint [--weights tests/assets/proxy] [--image examples/car.jpg] [--steps 28]

Outside the mask the final latents are the input image's own, bit for bit (checked here as well); what the
decoded output still changes there comes from the VAE decoder, whose group norms and mid-block attention see the
whole image. For each input (the given image, and one of the proxy model's own scenes) this runs, at 0.25
megapixels and level none: the edit with a mask over the middle quarter, the same edit without a mask, and the
round trip (strength 0: the input through the VAE). It prints, in grey levels (0-255), how far each is from the
round trip inside the mask and outside it (everywhere, and beyond 16 and 32 pixels of the mask's edge), and how
far the round trip itself is from the input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from flux import images
from flux.pipeline import EditRequest, KontextEditor
from measure.proxy import make_examples

ROOT = Path(__file__).resolve().parent.parent
MARGINS = (0, 16, 32)  # pixels between the mask's edge and the outside region measured


def proxy_scene(size: int = 256) -> PIL.Image.Image:
    """One of the proxy model's training scenes (a square and a circle on a flat background)."""
    example = make_examples(torch.Generator().manual_seed(1), 1, size)
    pixels = ((example.context[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return PIL.Image.fromarray(pixels)


def middle_quarter(size: tuple[int, int]) -> PIL.Image.Image:
    width, height = size
    mask = PIL.Image.new("L", size, 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def _grow(region: np.ndarray, pixels: int) -> np.ndarray:
    """`region` (H, W) bool grown by `pixels` in every direction."""
    if pixels == 0:
        return region
    t = torch.from_numpy(region.astype(np.float32))[None, None]
    return torch.nn.functional.max_pool2d(t, 2 * pixels + 1, 1, pixels)[0, 0].numpy() > 0.5


def measure(editor: KontextEditor, image: PIL.Image.Image, prompt: str, steps: int) -> dict[str, float]:
    mask = middle_quarter(image.size)
    base = dict(num_inference_steps=steps, seed=0, acceleration="none", megapixels=0.25)
    masked = editor.edit(EditRequest(prompt, image, mask=mask, **base))
    plain = editor.edit(EditRequest(prompt, image, **base))
    round_trip = editor.edit(EditRequest(prompt, image, strength=0.0, **base))
    width, height = masked.image.size
    small = torch.nn.functional.interpolate(images.mask_to_tensor(mask, width, height), size=masked.latents.shape[2:])
    kept = small[0, 0] == 0
    latent_diff = (masked.latents - round_trip.latents)[:, :, kept].abs().max().item()
    source, o, p, r = (
        np.asarray(x, np.int16)
        for x in (images._processor.resize(image, height, width), masked.image, plain.image, round_trip.image)
    )
    inside = np.asarray(images.mask_to_tensor(mask, width, height)[0, 0]) > 0.5
    row = {"latents outside: masked vs round trip (max)": latent_diff}
    row["inside: masked vs round trip"] = np.abs(o - r)[inside].mean()
    row["inside: unmasked vs round trip"] = np.abs(p - r)[inside].mean()
    for margin in MARGINS:
        outside = ~_grow(inside, margin)
        where = f"outside, beyond {margin} px" if margin else "outside"
        row[f"{where}: masked vs round trip"] = np.abs(o - r)[outside].mean()
        row[f"{where}: masked vs round trip (max)"] = np.abs(o - r)[outside].max()
        row[f"{where}: unmasked vs round trip"] = np.abs(p - r)[outside].mean()
    row["outside: round trip vs input"] = np.abs(r - source)[~inside].mean()
    row["outside: masked vs input"] = np.abs(o - source)[~inside].mean()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(ROOT / "tests" / "assets" / "proxy"))
    parser.add_argument("--image", default=str(ROOT / "examples" / "car.jpg"))
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args(argv)
    editor = KontextEditor.from_pretrained(args.weights, device="cpu")
    inputs = {Path(args.image).name: images.load_image(args.image), "proxy scene": proxy_scene()}
    rows = {name: measure(editor, img, "make the square red", args.steps) for name, img in inputs.items()}
    names = list(rows)
    print(f"| mean absolute difference (max: largest), grey levels; {args.steps} steps | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for key in rows[names[0]]:
        print(f"| {key} | " + " | ".join(f"{rows[n][key]:.3g}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
