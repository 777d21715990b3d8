"""Image files users send, well-formed and not, generated in code.

Each case is (bytes, expectation). An expectation is either the (width, height) the decoder must
produce, upright, or the text the error must contain. Used by the decoder's unit tests and by the
server suite, which sends every case over HTTP.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image

from tests.conftest import make_image

NOT_AN_IMAGE = "could not be read as an image: unrecognised or damaged file"
DAMAGED = "could not be read as an image: the file is damaged"
EMPTY = "could not be read as an image: the file is empty"
TOO_MANY_PIXELS = "100,000,000 pixels"


@dataclass(frozen=True)
class Case:
    build: Callable[[], bytes]
    expect: tuple[int, int] | str  # decoded (width, height), or a fragment of the error
    mime: str = "image/png"


def encode(img: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rgba() -> PIL.Image.Image:
    img = make_image(64, 48).convert("RGBA")
    alpha = np.zeros((48, 64), np.uint8)
    alpha[:, 32:] = 255
    img.putalpha(PIL.Image.fromarray(alpha))
    return img


def jpeg_with_orientation(orientation: int) -> bytes:
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    return encode(make_image(300, 200), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [PIL.Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header is rewritten to claim width×height pixels (a decompression bomb's
    header: the pixel data is tiny, the declared size is not)."""
    data = bytearray(encode(PIL.Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def png_with_text_bomb() -> bytes:
    """A valid PNG carrying a zTXt chunk that inflates to 64 MB."""
    data = encode(PIL.Image.new("RGB", (8, 8)), "PNG")
    body = b"Comment\0\0" + zlib.compress(b"\0" * (64 << 20), 9)
    chunk = struct.pack(">I", len(body) - 0) + b"zTXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + body))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


CASES: dict[str, Case] = {
    # Decodable: the expectation is the upright size.
    "jpeg": Case(lambda: encode(make_image(300, 200), "JPEG"), (300, 200), "image/jpeg"),
    "jpeg_cmyk": Case(lambda: encode(make_image(120, 80).convert("CMYK"), "JPEG"), (120, 80), "image/jpeg"),
    "jpeg_progressive": Case(lambda: encode(make_image(160, 120), "JPEG", progressive=True), (160, 120), "image/jpeg"),
    "jpeg_grayscale": Case(lambda: encode(make_image(90, 60).convert("L"), "JPEG"), (90, 60), "image/jpeg"),
    "jpeg_exif_rotated_90": Case(lambda: jpeg_with_orientation(6), (200, 300), "image/jpeg"),
    "jpeg_exif_orientation_invalid": Case(lambda: jpeg_with_orientation(9), (300, 200), "image/jpeg"),
    "png_rgba": Case(lambda: encode(rgba(), "PNG"), (64, 48)),
    "png_palette": Case(lambda: encode(make_image(50, 40).convert("P"), "PNG"), (50, 40)),
    "png_palette_transparent": Case(lambda: encode(rgba().convert("P"), "PNG", transparency=0), (64, 48)),
    "png_16bit_grayscale": Case(
        lambda: encode(PIL.Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"), (40, 30)
    ),
    "png_gray_alpha": Case(lambda: encode(rgba().convert("LA"), "PNG"), (64, 48)),
    "png_1bit": Case(lambda: encode(make_image(64, 64).convert("1"), "PNG"), (64, 64)),
    "webp": Case(lambda: encode(make_image(100, 70), "WEBP"), (100, 70), "image/webp"),
    "webp_lossless_alpha": Case(lambda: encode(rgba(), "WEBP", lossless=True), (64, 48), "image/webp"),
    "gif_animated": Case(animated_gif, (40, 30), "image/gif"),
    "gif_transparent": Case(lambda: encode(rgba().convert("P"), "GIF", transparency=0), (64, 48), "image/gif"),
    "bmp": Case(lambda: encode(make_image(33, 21), "BMP"), (33, 21), "image/bmp"),
    "tiff": Case(lambda: encode(make_image(70, 50), "TIFF"), (70, 50), "image/tiff"),
    "tiff_float": Case(
        lambda: encode(PIL.Image.fromarray(np.linspace(0, 255, 600, dtype=np.float32).reshape(20, 30)), "TIFF"),
        (30, 20),
        "image/tiff",
    ),
    "one_pixel": Case(lambda: encode(PIL.Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), (1, 1)),
    "three_by_five_hundred": Case(lambda: encode(make_image(3, 500), "PNG"), (3, 500)),
    "png_text_bomb": Case(png_with_text_bomb, DAMAGED),
    # Not decodable: the expectation is part of the error.
    "empty": Case(lambda: b"", EMPTY),
    "random_bytes": Case(lambda: np.random.default_rng(0).bytes(4096), NOT_AN_IMAGE),
    "html_page": Case(lambda: b"<!doctype html><html><body>Not found</body></html>", NOT_AN_IMAGE, "text/html"),
    "svg": Case(
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        NOT_AN_IMAGE,
        "image/svg+xml",
    ),
    "jpeg_truncated": Case(lambda: encode(make_image(300, 200), "JPEG")[:1500], DAMAGED, "image/jpeg"),
    "png_truncated": Case(lambda: encode(make_image(300, 200), "PNG")[:2000], DAMAGED),
    "gif_truncated": Case(lambda: animated_gif()[:100], DAMAGED, "image/gif"),
    "png_header_only": Case(lambda: encode(make_image(40, 40), "PNG")[:33], NOT_AN_IMAGE),
    "png_108_megapixels": Case(lambda: png_claiming(12000, 9000), "is 12000×9000 pixels; the most accepted is"),
    "png_400_megapixels": Case(lambda: png_claiming(20000, 20000), TOO_MANY_PIXELS),
}
