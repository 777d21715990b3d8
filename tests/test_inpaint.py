"""Masks and strength. At level none, our pipeline and diffusers' FluxKontextInpaintPipeline agree on the same
tiny weights (with a mask, with a strength below 1, with both), and deliberately broken variants fail that
comparison; outside the mask the final latents are the input image's, exactly, at every level; the edge cases
(all white, all black, strength 0) do what they say; another aspect ratio edits the input stretched to it."""

import logging
import types

import PIL.Image
import pytest
import torch
from diffusers import FluxKontextInpaintPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

from flux import images, sampling
from flux.errors import InvalidInputError
from flux.pipeline import EditRequest
from measure import inpaint
from tests.conftest import make_image
from tests.test_parity import BROKEN_MARGIN, TOLERANCE, rel

STEPS, SEED, PROMPT = 4, 3, "make the car red"
IMAGE = make_image(400, 300)
SIZE = images.output_size(images.MATCH_INPUT_IMAGE, *IMAGE.size, 0.25)  # (592, 448)


def box_mask(size=IMAGE.size, box=(100, 75, 300, 225), mode="L", white=255):
    mask = PIL.Image.new(mode, size, 0)
    mask.paste(white, box)
    return mask


MASK = box_mask()
CASES = {  # (mask, strength); without a mask, diffusers' reference gets an all-white one
    "mask": (MASK, 1.0),
    "mask, strength 0.6": (MASK, 0.6),
    "strength 0.6": (None, 0.6),
}


def request(mask, strength, **kw) -> EditRequest:
    kw = {"num_inference_steps": STEPS, "seed": SEED, "acceleration": "none", "megapixels": 0.25, **kw}
    return EditRequest(PROMPT, kw.pop("image", IMAGE), mask=mask, strength=strength, **kw)


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_dir):
    pipe = FluxKontextInpaintPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_latents(pipe, mask, strength, size, image_reference=None) -> torch.Tensor:
    """diffusers' final latents for IMAGE at output `size`: the input image given at that size (so both resize it
    the same way, once), the same mask image (all white without one), strength, seed and steps."""
    width, height = size
    packed = pipe(
        image=images._processor.resize(IMAGE, height, width),
        image_reference=image_reference,
        mask_image=mask if mask is not None else PIL.Image.new("L", IMAGE.size, 255),
        prompt=PROMPT,
        max_area=height * width,
        _auto_resize=False,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="latent",
    ).images
    return sampling.unpack(packed, height // 8, width // 8)


@pytest.fixture(scope="module")
def reference(inpaint_pipe):
    """diffusers' final latents per case."""
    return {name: diffusers_latents(inpaint_pipe, mask, strength, SIZE) for name, (mask, strength) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_inpainting(editor, reference, case):
    result = editor.edit(request(*CASES[case]))
    assert result.image.size == SIZE
    assert rel(result.latents, reference[case]) < TOLERANCE


OTHER_RATIOS = {  # (aspect_ratio, mask, strength): the 4:3 input edited into another shape
    "16:9, mask, strength 0.6": ("16:9", MASK, 0.6),
    "1:1, mask": ("1:1", MASK, 1.0),
    "9:16, strength 0.6": ("9:16", None, 0.6),
}


@pytest.mark.parametrize("case", list(OTHER_RATIOS))
def test_other_aspect_ratios_match_diffusers_inpainting_with_a_reference_image(inpaint_pipe, editor, case):
    """Another aspect ratio: the input image and the mask stretched to the output size are what the edit starts
    from and keeps; the context is the input at its own Kontext size. diffusers' inpainting pipeline does exactly
    that given the stretched input as `image` and the input as `image_reference` (each given at the size we use,
    so both resize once)."""
    aspect_ratio, mask, strength = OTHER_RATIOS[case]
    size = images.output_size(aspect_ratio, *IMAGE.size, 0.25)
    assert size != SIZE
    expected = diffusers_latents(
        inpaint_pipe, mask, strength, size, image_reference=images._processor.resize(IMAGE, SIZE[1], SIZE[0])
    )
    result = editor.edit(request(mask, strength, aspect_ratio=aspect_ratio))
    assert result.image.size == size and result.context_tokens == (SIZE[0] // 16) * (SIZE[1] // 16)
    assert rel(result.latents, expected) < TOLERANCE


def test_a_square_input_at_1_1_is_the_same_edit_as_at_its_own_ratio(editor):
    """1:1 and match_input_image give a square input the same output size: the same edit, bit for bit."""
    square = make_image(300, 300)
    mask = box_mask(square.size, (0, 0, 150, 300))
    own, square_ratio = (
        editor.edit(request(mask, 0.6, image=square, aspect_ratio=ratio)) for ratio in (images.MATCH_INPUT_IMAGE, "1:1")
    )
    assert own.image.size == square_ratio.image.size == (512, 512)
    assert torch.equal(own.latents, square_ratio.latents)


def _mask_inverted(monkeypatch):
    real = images.mask_to_tensor
    monkeypatch.setattr(images, "mask_to_tensor", lambda *a: 1 - real(*a))


def _kept_region_not_renoised(monkeypatch):
    real = sampling.SourceLatents.keep
    monkeypatch.setattr(sampling.SourceLatents, "keep", lambda self, img, noise, t: real(self, img, noise, 0.0))


def _start_from_noise(monkeypatch):
    monkeypatch.setattr(sampling.SourceLatents, "start", lambda self, noise, t: noise)


def _one_step_late(monkeypatch):
    real = sampling.first_step
    monkeypatch.setattr(sampling, "first_step", lambda n, strength: real(n, strength) + 1)


BROKEN = {
    "mask inverted": _mask_inverted,
    "kept region not re-noised": _kept_region_not_renoised,
    "start from noise": _start_from_noise,
    "one step late": _one_step_late,
}


@pytest.mark.parametrize("variant", list(BROKEN))
def test_broken_variants_fail_the_comparison(editor, reference, monkeypatch, variant):
    BROKEN[variant](monkeypatch)
    case = "mask, strength 0.6"
    assert rel(editor.edit(request(*CASES[case])).latents, reference[case]) > BROKEN_MARGIN


@pytest.mark.parametrize("steps", [4, 10, 28, 50])
def test_strength_runs_the_steps_diffusers_runs(steps):
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    pipe = types.SimpleNamespace(scheduler=scheduler)
    for strength in [i / 100 for i in range(101)]:
        _, expected = FluxKontextInpaintPipeline.get_timesteps(pipe, steps, strength, "cpu")
        assert steps - sampling.first_step(steps, strength) == expected, strength


def latents_outside(result, mask) -> torch.Tensor:
    width, height = result.image.size
    small = torch.nn.functional.interpolate(images.mask_to_tensor(mask, width, height), size=result.latents.shape[2:])
    return result.latents[:, :, small[0, 0] == 0]


def test_outside_the_mask_the_latents_are_the_input_images_with_taylor_seer(editor):
    """The kept region is put back on every step, extrapolated ones too: the final latents there are the input
    image's own, bit for bit (decoding mixes them with the edited ones only through the VAE). Level none: the
    measuring tool's test below."""
    round_trip = editor.edit(request(box_mask(white=0), 1.0))  # nothing to edit: the input's own latents
    masked = editor.edit(request(MASK, 1.0, num_inference_steps=8, acceleration="go really fast"))
    assert masked.transformer_calls == 7
    assert torch.equal(latents_outside(masked, MASK), latents_outside(round_trip, MASK))
    inside_change = rel(masked.latents, round_trip.latents)
    assert inside_change > 0.1
    assert masked.edited_fraction == pytest.approx(0.25, abs=0.02)  # the box is a quarter of the image


def test_an_all_white_mask_is_the_plain_edit_bit_for_bit(editor):
    plain = editor.edit(request(None, 1.0))
    white = editor.edit(request(box_mask(box=(0, 0, *IMAGE.size)), 1.0))
    assert torch.equal(white.latents, plain.latents) and white.image.tobytes() == plain.image.tobytes()


@pytest.mark.parametrize(
    "mask,strength,says",
    [(box_mask(white=0), 1.0, "the mask marks nothing to edit"), (None, 0.0, "strength 0.0 leaves no step to run")],
    ids=["all-black mask", "strength 0"],
)
def test_nothing_to_edit_returns_the_input_through_the_vae_with_a_warning(editor, caplog, mask, strength, says):
    with caplog.at_level(logging.WARNING, logger="flux.pipeline"):
        result = editor.edit(request(mask, strength))
    assert f"{says}: the output is the input image through the VAE" in caplog.text
    assert result.transformer_calls == 0 and result.steps == 0 and result.edited_fraction == 0
    width, height = SIZE
    expected = editor.encode_image(images.image_to_tensor(IMAGE, width, height))
    assert torch.equal(result.latents, expected)
    # (decoded from a contiguous copy: the encoder's channels-last output decodes to slightly other values)
    assert result.image.tobytes() == images.tensor_to_image(editor.decode(expected.contiguous())).tobytes()


def test_a_mask_that_only_misses_the_sampled_pixels_is_empty_too(editor, caplog):
    """Each latent pixel reads the mask at its top-left pixel (as diffusers downsamples it): a mask drawn only
    between those pixels marks nothing, and says so."""
    mask = PIL.Image.new("L", SIZE, 0)
    for x in range(4, SIZE[0], 8):
        mask.paste(255, (x, 0, x + 1, SIZE[1]))
    with caplog.at_level(logging.WARNING, logger="flux.pipeline"):
        assert editor.edit(request(mask, 1.0)).transformer_calls == 0
    assert "the mask marks nothing to edit" in caplog.text


def test_strength_below_one_starts_from_the_input_and_runs_fewer_steps(editor):
    round_trip = editor.edit(request(None, 0.0)).latents
    width, height = SIZE
    noise = sampling.pack(sampling.make_noise(SEED, (1, 16, height // 8, width // 8)))
    distances = []
    for strength, steps in [(0.5, 2), (1.0, 4)]:
        seen = []
        result = editor.edit(request(None, strength), on_step=seen.append)
        assert result.steps == result.transformer_calls == len(seen) == steps
        assert [s.total for s in seen] == [steps] * steps
        # The first step starts where the input image's own trajectory is at that step's time.
        first = seen[0]
        assert first.t < 1.0 or strength == 1.0
        torch.testing.assert_close(first.latents, sampling.noised(sampling.pack(round_trip), noise, first.t))
        distances.append(rel(result.latents, round_trip))
    assert distances == sorted(distances)  # the less strength, the nearer the input


def test_a_mask_with_several_reference_images_keeps_input_image(editor):
    """The context is the stitched images; the kept region is still input_image's, encoded at the output size."""
    extra = (make_image(160, 240, seed=4),)
    round_trip = editor.edit(request(box_mask(white=0), 1.0, extra_images=extra))
    masked = editor.edit(request(MASK, 1.0, extra_images=extra))
    assert masked.image.size == SIZE
    assert torch.equal(latents_outside(masked, MASK), latents_outside(round_trip, MASK))
    assert not torch.equal(masked.latents, round_trip.latents)


@pytest.mark.parametrize(
    "kw,name,says",
    [
        ({"strength": 1.5}, "strength", "between 0.0 and 1.0"),
        ({"strength": -0.1}, "strength", "between 0.0 and 1.0"),
        ({"strength": float("nan")}, "strength", "between 0.0 and 1.0"),
        ({"strength": True}, "strength", "must be a number"),
        ({"strength": "0.5"}, "strength", "must be a number"),
        ({"mask": "mask.png"}, "mask", "must be an image"),
    ],
)
def test_bad_masks_and_strengths_are_named(editor, kw, name, says):
    kw = {"mask": None, "strength": 1.0, **kw}
    with pytest.raises(InvalidInputError, match=says) as e:
        editor.edit(request(**kw))
    assert e.value.name == name


def test_the_measuring_tool_finds_the_latents_outside_the_mask_untouched(editor):
    row = inpaint.measure(editor, IMAGE, PROMPT, steps=4)  # at level none
    assert row["latents outside: masked vs round trip (max)"] == 0
    assert row["outside: masked vs round trip"] < row["outside: unmasked vs round trip"]
