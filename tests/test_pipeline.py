import math

import pytest
import torch

from flux import images
from flux.errors import InvalidInputError, NonFiniteOutputError
from flux.pipeline import EditRequest, KontextEditor
from tests.conftest import make_image

IMAGE = make_image(200, 150)


def edit(editor, **kw):
    kw.setdefault("num_inference_steps", 4)
    return editor.edit(EditRequest("make the car red", kw.pop("image", IMAGE), **kw))


def draft(editor, **kw):
    """An edit at 0.25 megapixels, for tests of seeds, step counts and modes rather than of sizes."""
    return edit(editor, megapixels=0.25, **kw)


def png_bytes(img, tmp_path):
    return images.save_image(img, tmp_path, "png", 100).read_bytes()


def test_same_seed_gives_identical_png_and_other_seeds_differ(editor, tmp_path):
    a = png_bytes(draft(editor, seed=0).image, tmp_path)
    assert a == png_bytes(draft(editor, seed=0).image, tmp_path)
    assert a != png_bytes(draft(editor, seed=1).image, tmp_path)


def test_seed_zero_is_a_seed_and_blank_is_random(editor):
    assert draft(editor, seed=0).seed == 0
    drawn = {draft(editor, seed=None).seed for _ in range(2)}
    assert len(drawn) == 2


def test_default_level_at_28_steps_calls_the_transformer_13_times(editor):
    result = draft(editor, seed=5, num_inference_steps=28)
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
        ("seed", 2**53),
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


# ---- several reference images, draft megapixels ----


@pytest.mark.parametrize("aspect_ratio", [images.MATCH_INPUT_IMAGE, "16:9", "2:3"])
def test_a_quarter_megapixel_halves_every_side(editor, aspect_ratio):
    full = images.output_size(aspect_ratio, *IMAGE.size)
    draft = edit(editor, seed=0, aspect_ratio=aspect_ratio, megapixels=0.25)
    assert draft.image.size == images.scale_size(full, 0.25)
    assert all(n % 16 == 0 for n in draft.image.size)  # halved, on the 16-pixel grid
    assert abs(draft.image.size[0] - full[0] / 2) <= 8 and abs(draft.image.size[1] - full[1] / 2) <= 8
    context = images.kontext_size(*IMAGE.size)
    assert draft.context_tokens == images.scale_size(context, 0.25)[0] * images.scale_size(context, 0.25)[1] // 256


def test_stitch_puts_the_images_side_by_side_in_one_context_image(editor):
    second = make_image(100, 300, seed=3)
    request = EditRequest("put them together", IMAGE, extra_images=(second,))
    ((stitched, size),) = request.context_images()
    assert stitched.size == (200 + 50, 150)  # the second resized to the first one's height
    assert size == images.kontext_size(250, 150)
    result = edit(editor, seed=0, extra_images=(second,))
    assert result.image.size == images.kontext_size(*IMAGE.size)  # match_input_image follows input_image
    assert result.context_tokens == size[0] * size[1] // 256


def test_separate_gives_each_image_its_own_plane_within_the_token_bound(editor):
    from flux import sampling

    extras = tuple(make_image(120 + 40 * i, 160, seed=i) for i in range(4))
    request = EditRequest("combine", IMAGE, extra_images=extras, multi_image_mode="separate")
    contexts = request.context_images()
    assert len(contexts) == 5
    tokens = [w * h // 256 for _, (w, h) in contexts]
    assert sum(tokens) <= 2 * 4150  # two megapixels' worth of the largest preferred resolution
    latents = [torch.zeros(1, 16, h // 8, w // 8) for _, (w, h) in contexts]
    inputs = sampling.kontext_inputs(latents, torch.zeros(1, 5, 32), torch.zeros(1, 32), 8, 8, seed=0)
    planes = inputs.img_ids[16:, 0].tolist()
    assert planes == [float(i + 1) for i, n in enumerate(tokens) for _ in range(n)]
    result = edit(editor, seed=0, extra_images=extras[:1], multi_image_mode="separate")
    assert result.context_tokens == sum(
        w * h // 256
        for _, (w, h) in EditRequest("x", IMAGE, extra_images=extras[:1], multi_image_mode="separate").context_images()
    )


def test_the_modes_give_different_edits(editor):
    second = make_image(200, 150, seed=9)
    a = draft(editor, seed=0, extra_images=(second,)).latents
    b = draft(editor, seed=0, extra_images=(second,), multi_image_mode="separate").latents
    c = draft(editor, seed=0).latents
    assert not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "field,value",
    [
        ("extra_images", tuple([IMAGE] * 5)),
        ("extra_images", ("not an image",)),
        ("multi_image_mode", "collage"),
        ("megapixels", 0.5),
    ],
)
def test_bad_multi_image_and_megapixel_inputs_are_named(editor, field, value):
    with pytest.raises(InvalidInputError) as e:
        edit(editor, **{field: value})
    assert e.value.name == {"extra_images": "input_images"}.get(field, field)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["NaN", "inf"])
def test_non_finite_latents_fail_the_edit_instead_of_returning_a_black_picture(tiny_dir, bad):
    broken = KontextEditor.from_pretrained(tiny_dir, device="cpu")
    with torch.no_grad():
        broken.components.transformer.proj_out.bias[3] = bad  # one output channel of every velocity
    with pytest.raises(NonFiniteOutputError, match=r"non-finite latent values \(NaN or infinity\).*no image"):
        edit(broken, seed=0)
