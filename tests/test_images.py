"""Decoding input images (every case in tests/hostile_files.py) and encoding outputs."""

from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch

from flux import images
from flux.errors import InvalidInputError
from measure.host import decoded, encoded, noise, photo_like, psnr
from tests.conftest import make_image
from tests.hostile_files import CASES, animated_gif, encode, rgba

IMAGE = make_image(200, 150)
ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path, data: bytes, loader=images.load_image) -> PIL.Image.Image:
    path = tmp_path / "input"
    path.write_bytes(data)
    return loader(path)


def load_mask(tmp_path, data: bytes) -> PIL.Image.Image:
    return load(tmp_path, data, images.load_mask)


@pytest.mark.parametrize("loader,mode,input_name", [(load, "RGB", "input_image"), (load_mask, "L", "mask")])
@pytest.mark.parametrize("name", CASES)
def test_each_case_decodes_upright_or_fails_naming_the_input(tmp_path, name, loader, mode, input_name):
    """As an input image (RGB) and as a mask (its luminance)."""
    case = CASES[name]
    if isinstance(case.expect, tuple):
        img = loader(tmp_path, case.build())
        assert img.mode == mode and img.size == case.expect
    else:
        with pytest.raises(InvalidInputError) as e:
            loader(tmp_path, case.build())
        assert e.value.name == input_name and str(e.value).startswith(f"{input_name} ") and case.expect in str(e.value)
        assert str(tmp_path) not in str(e.value)


def test_oversize_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    PIL.Image.new("RGB", (400, 300)).save(path)
    monkeypatch.setattr(images, "MAX_INPUT_PIXELS", 400 * 300 - 1)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an oversize image"))
    with pytest.raises(InvalidInputError, match="^input_image is 400×300 pixels"):
        images.load_image(path)


def test_transparency_is_flattened_onto_white(tmp_path):
    img = load(tmp_path, encode(rgba(), "PNG"))
    assert img.getpixel((0, 0)) == images.TRANSPARENT_BACKGROUND  # alpha 0 on the left half
    assert img.getpixel((63, 0)) == rgba().convert("RGB").getpixel((63, 0))  # opaque right half kept


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_flattened_onto_white(tmp_path, fmt):
    img = load(tmp_path, encode(rgba().convert("P"), fmt, transparency=0))
    assert img.getpixel((0, 0)) == images.TRANSPARENT_BACKGROUND


def test_sixteen_bit_grayscale_keeps_its_tones(tmp_path):
    img = load(tmp_path, encode(PIL.Image.fromarray(np.full((4, 4), 32768, np.uint16)), "PNG"))
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    red = PIL.Image.new("RGB", (16, 16), (220, 20, 20))
    img = load(tmp_path, encode(red.convert("CMYK"), "JPEG", quality=95))
    assert np.abs(np.asarray(img, np.int16) - np.asarray(red, np.int16)).max() < 12


def test_animated_gif_uses_its_first_frame(tmp_path):
    assert load(tmp_path, animated_gif()).getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied_to_the_pixels(tmp_path):
    src = PIL.Image.new("RGB", (40, 20), (0, 0, 0))
    src.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise: portrait, stripe on top
    img = load(tmp_path, encode(src, "PNG", exif=exif))
    assert img.size == (20, 40)
    assert img.getpixel((10, 2)) == (255, 255, 255) and img.getpixel((10, 37)) == (0, 0, 0)


def test_damaged_file_errors_do_not_reveal_the_server_path(tmp_path):
    path = tmp_path / "secret-dir" / "upload.jpg"
    path.parent.mkdir()
    path.write_bytes(encode(make_image(300, 200), "JPEG")[:1500])
    with pytest.raises(InvalidInputError) as e:
        images.load_image(path)
    assert "secret-dir" not in str(e.value)


@pytest.mark.parametrize("fmt,pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_save_image_writes_unique_complete_files(tmp_path, fmt, pil_format):
    a = images.save_image(IMAGE, tmp_path, fmt, 80, "made with random weights")
    b = images.save_image(IMAGE, tmp_path, fmt, 80)
    assert a != b and a.suffix == f".{fmt}"
    with PIL.Image.open(a) as img:
        assert img.format == pil_format and img.size == IMAGE.size
        assert img.getexif().get(0x010E) == "made with random weights"
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [f".{fmt}"] * 2


def test_save_image_leaves_nothing_when_encoding_fails(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PIL.Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        images.save_image(IMAGE, tmp_path, "png", 80)
    assert list(tmp_path.iterdir()) == []


def jpeg_file(tmp_path, size, **options) -> Path:
    path = tmp_path / f"photo-{size[0]}x{size[1]}.jpg"
    photo_like(*size).save(path, format="JPEG", quality=90, **options)
    return path


def context_pixels(img) -> np.ndarray:
    w, h = images.kontext_size(*img.size)
    return ((images.image_to_tensor(img, w, h)[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).numpy()


def test_a_large_jpeg_decodes_at_a_reduced_scale_never_below_its_kontext_size(tmp_path):
    path = jpeg_file(tmp_path, (2400, 1800))  # Kontext size 1184x880: half scale still covers it
    drafted, full = images.load_image(path), images.load_image(path, draft=False)
    assert full.size == (2400, 1800) and drafted.size == (1200, 900)
    assert images.kontext_size(*drafted.size) == images.kontext_size(*full.size)
    assert psnr(context_pixels(drafted), context_pixels(full)) > 45  # measured 52 dB (docs/benchmarks.md)


def test_a_drafted_jpeg_keeps_its_exif_orientation(tmp_path):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotated 90°: stored landscape, shown portrait
    assert images.load_image(jpeg_file(tmp_path, (2400, 1800), exif=exif)).size == (900, 1200)


def test_images_without_room_for_a_smaller_scale_decode_in_full(tmp_path):
    assert images.load_image(jpeg_file(tmp_path, (2000, 1500))).size == (2000, 1500)  # 1/2 would be < 1184x880
    png = tmp_path / "large.png"
    photo_like(2400, 1800).save(png)
    assert images.load_image(png).size == (2400, 1800)  # draft mode is JPEG's


@pytest.mark.parametrize("name", ["photo-like", "smooth", "noise"])
def test_faster_output_encoding_stays_within_its_bounds(tmp_path, name):
    """The served WebP effort and PNG level against Pillow's defaults (method 4, level 6): WebP at most 30 %
    more bytes and within 0.3 dB PSNR; PNG lossless and at most 35 % more bytes."""
    size = (1184, 880)
    img = {
        "photo-like": lambda: photo_like(*size, seed=1),
        "smooth": lambda: PIL.Image.open(ROOT / "examples" / "car.jpg").convert("RGB").resize(size),
        "noise": lambda: noise(*size),
    }[name]()
    webp = images.save_image(img, tmp_path, "webp", 80).read_bytes()
    default_webp = encoded(img, "WEBP", quality=80)
    assert len(webp) <= 1.3 * len(default_webp)
    assert psnr(decoded(webp), img) >= psnr(decoded(default_webp), img) - 0.3
    png = images.save_image(img, tmp_path, "png", 80).read_bytes()
    assert len(png) <= 1.35 * len(encoded(img, "PNG")) and np.array_equal(np.asarray(decoded(png)), np.asarray(img))


# ---- masks: any mode, read as its luminance (white edits, black keeps) ---------------------------------------


def half(mode: str, left, right) -> PIL.Image.Image:
    """A 64×48 image in `mode`: `left` on the left half, `right` on the right half."""
    img = PIL.Image.new(mode, (64, 48), left)
    img.paste(right, (32, 0, 64, 48))
    return img


@pytest.mark.parametrize(
    "img,edited_side",
    [
        (half("RGB", (0, 0, 0), (255, 255, 255)), "right"),
        (half("RGB", (255, 140, 140), (20, 20, 200)), "left"),  # luma: pink 174, dark blue 40 (below 128)
        (half("RGB", (250, 250, 60), (255, 0, 0)), "left"),  # yellow 229 edits, pure red 76 keeps
        (half("RGBA", (255, 255, 255, 0), (255, 255, 255, 255)), "right"),  # transparent counts as black
        (half("LA", (255, 0), (255, 255)), "right"),
        (half("1", 0, 1), "right"),
        (half("I;16", 0, 65535), "right"),
        (half("I;16", 65535, 20000), "left"),  # 20000/65535 of white is below half grey: not clipped to white
        (half("CMYK", (0, 0, 0, 255), (0, 0, 0, 0)), "right"),
        (half("L", 127, 128), "right"),  # half grey is the threshold
    ],
    ids=["rgb", "colour", "yellow-red", "rgba", "la", "1-bit", "16-bit", "16-bit-dark", "cmyk", "threshold"],
)
def test_a_mask_in_any_mode_reads_as_its_luminance(tmp_path, img, edited_side):
    mask = images.mask_to_tensor(img, 64, 48)
    assert mask.shape == (1, 1, 48, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    left, right = mask[..., :32], mask[..., 32:]
    edited, kept = (right, left) if edited_side == "right" else (left, right)
    assert bool((edited == 1).all()) and bool((kept == 0).all())
    # The same through a file (TIFF stores every one of these modes losslessly).
    assert torch.equal(images.mask_to_tensor(load_mask(tmp_path, encode(img, "TIFF")), 64, 48), mask)


def test_palette_mask_with_transparency(tmp_path):
    img = half("RGBA", (255, 255, 255, 0), (255, 255, 255, 255)).convert("P")
    mask = images.mask_to_tensor(load_mask(tmp_path, encode(img, "PNG", transparency=img.getpixel((0, 0)))), 64, 48)
    assert bool((mask[..., 32:] == 1).all()) and bool((mask[..., :32] == 0).all())


def test_a_mask_of_another_size_is_resized_to_the_output():
    mask = images.mask_to_tensor(half("L", 0, 255), 128, 32)
    assert mask.shape == (1, 1, 32, 128)
    assert bool((mask[..., :60] == 0).all()) and bool((mask[..., 68:] == 1).all())
