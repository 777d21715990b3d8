"""At level none, our pipeline and diffusers' FluxKontextPipeline agree on the same tiny weights.

The tiny model's embedders are scaled up (flux.tiny) so that the velocity depends strongly on the
timestep, guidance, text and context image; the broken variants below show that the comparison
catches a wrong schedule, guidance, context image or context position ids.
"""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline

from flux import images, sampling
from flux.optimize import AccelerationConfig
from flux.pipeline import EditRequest, KontextEditor
from tests.conftest import make_image

STEPS, SEED, PROMPT = 4, 3, "make the car red"
TOLERANCE = 1e-4  # relative L2 of the final latents; measured agreement is ~2e-6
BROKEN_MARGIN = 10 * TOLERANCE  # a broken variant must miss the reference by at least this

CASES = {
    "match_input_image, landscape input": (images.MATCH_INPUT_IMAGE, (400, 300)),
    "16:9 output, portrait input": ("16:9", (240, 400)),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Final latents and image from diffusers for each case."""
    pipe = FluxKontextPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for name, (aspect_ratio, size) in CASES.items():
        img = make_image(*size)
        width, height = images.output_size(aspect_ratio, *size)
        kwargs = dict(
            image=img,
            prompt=PROMPT,
            height=height,
            width=width,
            max_area=height * width,
            num_inference_steps=STEPS,
            guidance_scale=2.5,
        )
        packed = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images
        image = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
        out[name] = (sampling.unpack(packed, height // 8, width // 8), image)
    return out


def edit(editor, case, **overrides):
    aspect_ratio, size = CASES[case]
    request = EditRequest(
        PROMPT,
        overrides.pop("image", make_image(*size)),
        aspect_ratio=aspect_ratio,
        num_inference_steps=STEPS,
        seed=SEED,
        acceleration="none",
        **overrides,
    )
    return editor.edit(request)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(editor, reference, case):
    ref_latents, ref_image = reference[case]
    result = edit(editor, case)
    assert result.image.size == ref_image.size == images.output_size(CASES[case][0], *CASES[case][1])
    assert rel(result.latents, ref_latents) < TOLERANCE
    diff = np.abs(np.asarray(result.image, np.int16) - np.asarray(ref_image, np.int16))
    assert diff.max() <= 1


def test_matches_diffusers_with_every_acceleration_off(tiny_dir, reference):
    """The server's loading path with accelerations switched off is the path the parity holds for."""
    editor = KontextEditor.from_pretrained(tiny_dir, device="cpu", accelerations=AccelerationConfig())
    case = "match_input_image, landscape input"
    assert rel(edit(editor, case).latents, reference[case][0]) < TOLERANCE


def _no_shift(monkeypatch):
    monkeypatch.setattr(sampling.ScheduleConfig, "mu", lambda self, n: 0.0)


def _context_ids_zero(monkeypatch):
    real = sampling.position_ids
    monkeypatch.setattr(sampling, "position_ids", lambda h, w, index: real(h, w, 0))


def _context_ignored(monkeypatch):
    real = sampling.kontext_inputs

    def kontext_inputs(*args, **kwargs):
        inputs = real(*args, **kwargs)
        return dataclasses.replace(inputs, context=torch.zeros_like(inputs.context))

    monkeypatch.setattr(sampling, "kontext_inputs", kontext_inputs)


BROKEN = {
    "schedule without the shift": (_no_shift, {}),
    "context ids index 0": (_context_ids_zero, {}),
    "context ignored": (_context_ignored, {}),
    "guidance 3.5": (None, {"guidance": 3.5}),
    "another context image": (None, {"image": make_image(400, 300, seed=7)}),
}


@pytest.mark.parametrize("variant", list(BROKEN))
def test_broken_variants_fail_the_comparison(editor, reference, monkeypatch, variant):
    breaker, overrides = BROKEN[variant]
    if breaker is not None:
        breaker(monkeypatch)
    case = "match_input_image, landscape input"
    result = edit(editor, case, **overrides)
    assert rel(result.latents, reference[case][0]) > BROKEN_MARGIN
