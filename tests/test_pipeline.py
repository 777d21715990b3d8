import math

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest

from flux import images
from flux.errors import InvalidInputError
from flux.pipeline import EditRequest
from tests.conftest import make_image

IMAGE = make_image(200, 150)


def edit(editor, **kw):
    kw.setdefault("num_inference_steps", 4)
    return editor.edit(EditRequest("make the car red", kw.pop("image", IMAGE), **kw))


def png_bytes(img, tmp_path):
    return images.save_image(img, tmp_path, "png", 100).read_bytes()


def test_same_seed_gives_identical_png_and_other_seeds_differ(editor, tmp_path):
    a = png_bytes(edit(editor, seed=0).image, tmp_path)
    assert a == png_bytes(edit(editor, seed=0).image, tmp_path)
    assert a != png_bytes(edit(editor, seed=1).image, tmp_path)


def test_seed_zero_is_a_seed_and_blank_is_random(editor):
    assert edit(editor, seed=0).seed == 0
    drawn = {edit(editor, seed=None).seed for _ in range(2)}
    assert len(drawn) == 2


def test_default_level_at_28_steps_calls_the_transformer_13_times(editor):
    result = edit(editor, seed=5, num_inference_steps=28)
    assert result.transformer_calls == 13
    assert result.random_weights


@pytest.mark.parametrize(
    "aspect_ratio,input_size,expected",
    [
        ("match_input_image", (200, 150), (1184, 880)),
        ("match_input_image", (150, 200), (880, 1184)),
        ("match_input_image", (512, 512), (1024, 1024)),
        ("21:9", (200, 150), (1568, 672)),
        ("9:16", (200, 150), (800, 1328)),
    ],
)
def test_output_size(editor, aspect_ratio, input_size, expected):
    assert images.output_size(aspect_ratio, *input_size) == expected
    assert edit(editor, seed=0, aspect_ratio=aspect_ratio, image=make_image(*input_size)).image.size == expected


@pytest.mark.parametrize(
    "field,value",
    [
        ("prompt", ""),
        ("prompt", "   "),
        ("num_inference_steps", 3),
        ("num_inference_steps", 51),
        ("num_inference_steps", 4.5),
        ("guidance", -0.1),
        ("guidance", 10.5),
        ("guidance", math.nan),
        ("aspect_ratio", "7:3"),
        ("seed", -1),
        ("seed", 2**63),
        ("acceleration", "warp speed"),
        ("n_derivatives", 0),
        ("n_derivatives", 4),
    ],
)
def test_invalid_inputs_are_named(editor, field, value):
    kw = {"prompt": "make it red", "image": IMAGE, field: value}
    with pytest.raises(InvalidInputError) as e:
        editor.edit(EditRequest(**kw))
    assert e.value.name == field
    assert str(e.value).startswith(field)


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InvalidInputError, match="^input_image could not be read"):
        images.load_image(bad)


def test_oversize_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    PIL.Image.new("RGB", (400, 300)).save(path)
    monkeypatch.setattr(images, "MAX_INPUT_PIXELS", 400 * 300 - 1)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an oversize image"))
    with pytest.raises(InvalidInputError, match="^input_image is 400×300 pixels"):
        images.load_image(path)


def test_transparency_is_flattened_onto_white(tmp_path):
    path = tmp_path / "clear.png"
    PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    assert images.load_image(path).getpixel((0, 0)) == images.TRANSPARENT_BACKGROUND


def test_sixteen_bit_grayscale_keeps_its_tones(tmp_path):
    path = tmp_path / "gray16.png"
    PIL.Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(path)
    assert images.load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90°: portrait
    PIL.Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert images.load_image(path).size == (20, 40)


@pytest.mark.parametrize("fmt,pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_save_image_writes_unique_complete_files(tmp_path, fmt, pil_format):
    a = images.save_image(IMAGE, tmp_path, fmt, 80, "made with random weights")
    b = images.save_image(IMAGE, tmp_path, fmt, 80)
    assert a != b and a.suffix == f".{fmt}"
    with PIL.Image.open(a) as img:
        assert img.format == pil_format and img.size == IMAGE.size
        assert img.getexif().get(0x010E) == "made with random weights"
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [f".{fmt}"] * 2


@pytest.mark.parametrize(
    "level,n_derivatives,expected", [("go fast", None, 1), ("go really fast", None, 2), ("go really fast", 3, 3)]
)
def test_the_level_picks_the_extrapolation_order_unless_the_request_names_one(
    editor, monkeypatch, level, n_derivatives, expected
):
    from flux import sampling

    seen = []
    real_denoise = sampling.denoise

    def spy(*args, **kwargs):
        seen.append(kwargs["seer"])
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(sampling, "denoise", spy)
    edit(editor, seed=0, acceleration=level, n_derivatives=n_derivatives)
    assert [s.order for s in seen] == [expected]
