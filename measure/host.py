"""Host-side costs of one edit, side by side in one process, each as a fraction of the estimated GPU edit.

    python -m measure.host --repeats 5

What the server does on the CPU around the GPU's work: decode the input (a 12 MP phone JPEG), resize it to
the context size, encode the 1 MP output (webp, jpg or png at quality 80) and turn the file into a data URI
(what the server returns without an upload URL). Each is timed as the server runs it now and as it ran before
(full decodes, Pillow's default WebP effort and PNG level), median of --repeats, on the same images in the same
process: ratios are what this reports, the seconds only hold for this machine.

The estimated GPU edit is the floor of the served default (`go really fast`: 13 transformer calls at 1 MP,
bf16) at the rates assumed for an H100 (measure.floors.ASSUMED_H100): a lower bound of the GPU time, so each
fraction here is an upper bound. The images are synthetic (no photos ship with the repository): a 12 MP
"photo" of fractal (1/f) noise with sensor grain, saved as a phone saves it (JPEG quality 90), and a 1 MP
output of the same kind, examples/car.jpg enlarged to 1 MP (smooth content, where WebP's effort matters most
for size), and uniform noise (what a random-weight model outputs: the hardest case).
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from flux import images
from flux.taylor_seer_utils import AccelerationLevel, generate_compute_step_map
from measure import floors

ROOT = Path(__file__).resolve().parent.parent
PHONE_SIZE = (4032, 3024)  # a 12 MP phone camera
OUTPUT_SIZE = (1184, 880)  # its Kontext size: what the edit outputs at match_input_image
QUALITY = 80  # the served default


def photo_like(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """Fractal noise (octaves of smooth noise, amplitude falling with frequency as in natural images) with
    a little per-pixel grain: about as hard to compress as a photo, unlike a gradient."""
    generator = torch.Generator("cpu").manual_seed(seed)
    field = torch.zeros(1, 3, height, width)
    for octave in range(9):
        coarse = torch.randn(1, 3, max(2, height >> octave), max(2, width >> octave), generator=generator)
        field += torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear") * 2 ** (0.7 * octave)
    field = (field - field.mean()) / field.std() * 50 + 120 + 3 * torch.randn(field.shape, generator=generator)
    return PIL.Image.fromarray(field[0].clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def noise(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """Uniform noise: what a random-weight model outputs, the hardest case for every encoder."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def estimated_gpu_edit_s() -> float:
    """The floor of the served default at the assumed H100 rates (see the module's docstring)."""
    flops = floors.transformer_flops(floors.full_config(), floors.image_tokens(OUTPUT_SIZE))
    calls = sum(generate_compute_step_map(AccelerationLevel.GO_REALLY_FAST, 28))
    return calls * floors.call_floor(flops, floors.ASSUMED_H100)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The median seconds of `repeats` calls (after one untimed call), and the last result."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def encoded(img: PIL.Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def psnr(a: PIL.Image.Image | np.ndarray, b: PIL.Image.Image | np.ndarray) -> float:
    """PSNR in dB of two 8-bit images (inf when identical)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def decoded(data: bytes) -> PIL.Image.Image:
    return PIL.Image.open(io.BytesIO(data)).convert("RGB")


def measure(repeats: int, workdir: Path) -> list[dict]:
    """Every row of the report: step, variant, seconds, served (what the server does now), bytes, PSNR."""
    rows = []

    def row(step: str, variant: str, seconds: float, served: bool, **extra) -> None:
        rows.append({"step": step, "variant": variant, "seconds": seconds, "served": served, **extra})

    phone = workdir / "phone.jpg"
    photo_like(*PHONE_SIZE).save(phone, format="JPEG", quality=90)
    width, height = images.kontext_size(*PHONE_SIZE)
    for draft in (False, True):
        seconds, img = timed(lambda draft=draft: images.load_image(phone, draft=draft), repeats)
        row("decode a 12 MP JPEG", f"{'draft' if draft else 'full'} decode to {img.width}x{img.height}", seconds, draft)
        seconds, tensor = timed(lambda img=img: images.image_to_tensor(img, width, height), repeats)
        row("resize to the context size", f"from {img.width}x{img.height} to {width}x{height}", seconds, draft)
        if not draft:
            full = tensor
    as_uint8 = [((t[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).numpy() for t in (full, tensor)]
    rows[-1]["psnr_db"] = psnr(*as_uint8)  # the drafted context image against the fully decoded one

    outputs = {
        "photo-like": photo_like(*OUTPUT_SIZE, seed=1),
        "car.jpg enlarged": PIL.Image.open(ROOT / "examples" / "car.jpg").convert("RGB").resize(OUTPUT_SIZE),
        "noise (a random model's)": noise(*OUTPUT_SIZE),
    }
    for name, out in outputs.items():
        webp = [(m, f"method {m}", {"quality": QUALITY, "method": m}) for m in range(7)]
        png = [(level, f"level {level}", {"compress_level": level}) for level in (images.PNG_COMPRESS_LEVEL, 6)]
        for fmt, options, served in [
            *[("WEBP", o, m == images.WEBP_METHOD) for m, _, o in webp],
            ("JPEG", {"quality": QUALITY}, True),
            *[("PNG", o, level == images.PNG_COMPRESS_LEVEL) for level, _, o in png],
        ]:
            seconds, data = timed(lambda out=out, fmt=fmt, options=options: encoded(out, fmt, **options), repeats)
            detail = ", ".join(f"{k} {v}" for k, v in options.items())
            row(
                f"encode the 1 MP output ({name})",
                f"{fmt} {detail}",
                seconds,
                served,
                bytes=len(data),
                psnr_db=psnr(decoded(data), out),
            )
            if served:
                mime = {"WEBP": "image/webp", "JPEG": "image/jpeg", "PNG": "image/png"}[fmt]
                seconds, uri = timed(
                    lambda data=data, mime=mime: f"data:{mime};base64," + base64.b64encode(data).decode(), repeats
                )
                row(f"data URI ({name})", f"{fmt}: {len(data)} bytes", seconds, True, bytes=len(uri))
    return rows


def render(rows: list[dict], gpu_s: float) -> str:
    lines = [
        f"Estimated GPU edit (floor of go really fast at 1 MP, assumed H100 rates): {gpu_s:.2f} s; "
        f"5 % is {0.05 * gpu_s:.3f} s",
        "",
        "| step | variant | served | seconds | × GPU edit | bytes | PSNR dB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        size = f"{r['bytes']:,}" if "bytes" in r else ""
        quality = "" if "psnr_db" not in r else "lossless" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.2f}"
        lines.append(
            f"| {r['step']} | {r['variant']} | {'yes' if r['served'] else ''} | {r['seconds']:.4f} "
            f"| {100 * r['seconds'] / gpu_s:.1f} % | {size} | {quality} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each step (the median is reported)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        rows = measure(args.repeats, Path(workdir))
    print(render(rows, estimated_gpu_edit_s()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
