import math

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


@pytest.mark.parametrize(
    "level,n_derivatives,expected", [("go fast", None, 1), ("go really fast", None, 2), ("go really fast", 3, 3)]
)
def test_the_level_picks_the_extrapolation_order_unless_the_request_names_one(
    editor, monkeypatch, level, n_derivatives, expected
):
    import inspect

    from flux import sampling

    seen = []
    real_denoise = sampling.denoise

    def spy(*args, **kwargs):
        seen.append(inspect.signature(real_denoise).bind(*args, **kwargs).arguments["extrapolation"])
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(sampling, "denoise", spy)
    edit(editor, seed=0, acceleration=level, n_derivatives=n_derivatives)
    assert [s.order for s in seen] == [expected]
