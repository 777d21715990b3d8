"""Input images in, output files out: decoding, the Kontext sizes, tensors, encoding."""

from __future__ import annotations

import enum
import math
import os
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from flux.errors import InvalidInputError

MATCH_INPUT_IMAGE = "match_input_image"

# Output sizes (width, height) for a fixed aspect ratio, as Replicate's flux-kontext-dev serves them.
ASPECT_RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1328, 800),
    "21:9": (1568, 672),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
    "4:5": (944, 1104),
    "5:4": (1104, 944),
    "3:4": (880, 1184),
    "4:3": (1184, 880),
    "9:16": (800, 1328),
    "9:21": (672, 1568),
}
ASPECT_RATIOS = [MATCH_INPUT_IMAGE, *ASPECT_RATIO_SIZES]

MAX_INPUT_PIXELS = 100_000_000
"""Largest input accepted (width × height), checked from the header before the pixels are decoded.
The edit works at about one megapixel, so larger inputs only cost memory."""

TRANSPARENT_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited onto white before editing."""

# Resizing and [-1, 1] normalisation exactly as diffusers' Kontext pipeline does them (Lanczos).
_processor = VaeImageProcessor(vae_scale_factor=16)
# Masks as diffusers' Kontext inpainting pipeline reads them: grey levels resized (Lanczos), then 0 below half
# grey and 1 from half grey up.
_mask_processor = VaeImageProcessor(
    vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True
)


class OutputFormat(enum.StrEnum):
    WEBP = "webp"
    JPG = "jpg"
    PNG = "png"


_PIL_FORMAT = {OutputFormat.WEBP: "WEBP", OutputFormat.JPG: "JPEG", OutputFormat.PNG: "PNG"}
MIN_QUALITY, MAX_QUALITY = 0, 100
DEFAULT_FORMAT, DEFAULT_QUALITY = OutputFormat.WEBP, 80  # as Replicate's flux-kontext-dev


def check_output_options(fmt: object, quality: object) -> None:
    """Raise InvalidInputError naming output_format or output_quality unless both can be used."""
    if fmt not in list(OutputFormat):
        raise InvalidInputError("output_format", f"must be one of {[f.value for f in OutputFormat]}, got {fmt!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not MIN_QUALITY <= quality <= MAX_QUALITY:
        raise InvalidInputError(
            "output_quality", f"must be an integer from {MIN_QUALITY} to {MAX_QUALITY}, got {quality!r}"
        )


WEBP_METHOD = 1
"""libwebp's effort, 0 (fast) to 6; Pillow's default is 4. Measured at 1 MP (docs/benchmarks.md, host-side costs):
1 encodes 2-4× faster, the same quality (PSNR within 0.3 dB) and at most 30 % more bytes (tested)."""
PNG_COMPRESS_LEVEL = 1
"""zlib's level for PNG, 0-9; Pillow's default is 6. Measured at 1 MP: 1 encodes up to 2× faster, at most
35 % more bytes (tested), and PNG stays lossless."""


def load_image(path: str | os.PathLike, name: str = "input_image", draft: bool = True) -> PIL.Image.Image:
    """Open an image file as RGB, with its EXIF orientation applied and transparency flattened.

    Only the first frame of an animated image is used. Raises InvalidInputError naming the input
    `name`, and saying why, for anything that is not a readable image of at most MAX_INPUT_PIXELS
    pixels; the size is checked from the header, before decoding.

    With `draft`, a JPEG at least twice its Kontext size on each side is decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg scales in the DCT; Pillow's draft mode), never below that size: the edit resizes it to the
    Kontext size anyway. A 12 MP phone photo then decodes and resizes in about half the time
    (docs/benchmarks.md, host-side costs), and the context image differs by less than one grey level.
    """
    return to_rgb(open_image(path, name, draft))


def load_mask(path: str | os.PathLike, name: str = "mask") -> PIL.Image.Image:
    """Open a mask image as its luminance (mode L: white edits, black keeps), checked and decoded as load_image
    checks and decodes; see to_luminance for the other modes."""
    return to_luminance(open_image(path, name))


def open_image(path: str | os.PathLike, name: str, draft: bool = True) -> PIL.Image.Image:
    """The decoded first frame of an image file, upright (EXIF orientation applied), in the file's own mode,
    drafted as load_image describes. Raises InvalidInputError naming `name` as load_image describes."""
    if os.path.getsize(path) == 0:
        raise InvalidInputError(name, "could not be read as an image: the file is empty")
    with warnings.catch_warnings():
        # Pillow warns from 89 MP; the limit enforced here is MAX_INPUT_PIXELS.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            with PIL.Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_INPUT_PIXELS:
                    raise InvalidInputError(
                        name, f"is {width}×{height} pixels; the most accepted is {MAX_INPUT_PIXELS:,} pixels"
                    )
                if draft:
                    img.draft(None, kontext_size(width, height))  # JPEG only; a no-op for other formats
                img = PIL.ImageOps.exif_transpose(img)
                img.load()
        except InvalidInputError:
            raise
        except PIL.UnidentifiedImageError as e:
            raise InvalidInputError(
                name,
                "could not be read as an image: unrecognised or damaged file (send jpeg, png, gif or webp)",
            ) from e
        except PIL.Image.DecompressionBombError as e:
            raise InvalidInputError(name, f"has more than {MAX_INPUT_PIXELS:,} pixels") from e
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            # Pillow's messages say what is wrong ("image file is truncated", "broken data stream");
            # the file's path on this machine is not the client's business.
            reason = str(e).replace(str(path), "the file")
            raise InvalidInputError(name, f"could not be read as an image: the file is damaged ({reason})") from e
    return img


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """RGB copy of `img`; pixels with alpha are composited onto TRANSPARENT_BACKGROUND."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grayscale: Pillow's own conversion clips every value above 255 to white.
        pixels = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        return PIL.Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8)).convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _has_alpha(img: PIL.Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def to_luminance(img: PIL.Image.Image) -> PIL.Image.Image:
    """The image's luminance as mode L (ITU-R 601-2 luma of its RGB, as Pillow converts). Transparent pixels
    count as black: a mask drawn in white on a transparent layer edits where it is drawn. 16-bit images are
    scaled to 8 bits, not clipped."""
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
    return to_rgb(img).convert("L")


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext resolution (width, height) whose aspect ratio is nearest the image's.
    Kontext was trained on these sizes."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def output_size(aspect_ratio: str, input_width: int, input_height: int, megapixels: float = 1.0) -> tuple[int, int]:
    """(width, height) of the edited image; at 0.25 megapixels every size is halved on each side."""
    if aspect_ratio == MATCH_INPUT_IMAGE:
        size = kontext_size(input_width, input_height)
    elif aspect_ratio in ASPECT_RATIO_SIZES:
        size = ASPECT_RATIO_SIZES[aspect_ratio]
    else:
        raise InvalidInputError("aspect_ratio", f"must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
    return scale_size(size, megapixels)


MEGAPIXELS = (1.0, 0.25)
"""The served sizes are about one megapixel; 0.25 halves every side (drafts: about 4× less work)."""


def scale_size(size: tuple[int, int], area_factor: float, round_down: bool = False) -> tuple[int, int]:
    """`size` (width, height) with its area scaled by `area_factor`, each side a multiple of 16 (the
    latents are packed 2×2 after the VAE's 8× downsampling): the nearest one, or the next one down."""
    side = math.sqrt(area_factor)

    def snap(n: int) -> int:
        x = n * side / 16
        return 16 * max(1, math.floor(x) if round_down else math.floor(x + 0.5))

    return snap(size[0]), snap(size[1])


def stitch(imgs: list[PIL.Image.Image]) -> PIL.Image.Image:
    """The images side by side, left to right, each resized (Lanczos) to the first one's height."""
    height = imgs[0].height
    resized = [
        img
        if img.height == height
        else img.resize((max(1, round(img.width * height / img.height)), height), PIL.Image.LANCZOS)
        for img in imgs
    ]
    canvas = PIL.Image.new("RGB", (sum(img.width for img in resized), height))
    x = 0
    for img in resized:
        canvas.paste(img, (x, 0))
        x += img.width
    return canvas


def image_to_tensor(img: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 3, height, width) float32 in [-1, 1], resized with Lanczos."""
    return _processor.preprocess(_processor.resize(img, height, width), height, width)


def mask_to_tensor(mask: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 1, height, width) float32: 1 where `mask` (any mode, read as its luminance) is at least half grey after
    resizing (Lanczos), 0 elsewhere."""
    return _mask_processor.preprocess(to_luminance(mask), height, width)


def tensor_to_image(pixels: torch.Tensor) -> PIL.Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL RGB image."""
    return _processor.postprocess(pixels.float(), output_type="pil")[0]


def save_image(
    img: PIL.Image.Image, directory: str | os.PathLike, fmt: OutputFormat | str, quality: int, description: str = ""
) -> Path:
    """Encode `img` into a new uniquely named file in `directory`.

    The file appears complete or not at all (written beside, then renamed). `quality` applies to
    webp and jpg. `description`, if given, is stored as the EXIF ImageDescription.
    """
    fmt = OutputFormat(fmt)
    directory = Path(directory)
    target = directory / f"output-{uuid.uuid4().hex[:12]}.{fmt.value}"
    kwargs: dict = {}
    if fmt in (OutputFormat.WEBP, OutputFormat.JPG):
        kwargs["quality"] = quality
    if fmt == OutputFormat.WEBP:
        kwargs["method"] = WEBP_METHOD
    if fmt == OutputFormat.PNG:
        kwargs["compress_level"] = PNG_COMPRESS_LEVEL
    if description:
        exif = PIL.Image.Exif()
        exif[0x010E] = description  # ImageDescription
        kwargs["exif"] = exif
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=_PIL_FORMAT[fmt], **kwargs)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
