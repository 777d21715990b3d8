import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

from flux import sampling
from flux.taylor_seer_utils import AccelerationLevel, AdaptiveConfig, generate_compute_step_map


def test_schedule_endpoints_and_shift_line():
    cfg = sampling.ScheduleConfig()
    assert cfg.mu(256) == pytest.approx(0.5)
    assert cfg.mu(4096) == pytest.approx(1.15)
    ts = sampling.get_schedule(28, 4096)
    assert len(ts) == 29 and ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(ts))
    # the shift spends more of the schedule at high noise: the midpoint moves above 0.5
    assert sampling.get_schedule(2, 4096)[1] == pytest.approx(1 / (1 + math.exp(-1.15)))


@pytest.mark.parametrize("steps,seq_len", [(4, 4096), (28, 4096), (28, 3888), (50, 1024)])
def test_schedule_matches_diffusers_scheduler(steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sigmas = [1.0 - i / steps for i in range(steps)]
    scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(seq_len))
    ours = torch.tensor(sampling.get_schedule(steps, seq_len))
    torch.testing.assert_close(ours.float(), scheduler.sigmas, rtol=1e-6, atol=1e-6)


def test_pack_unpack_match_diffusers_and_round_trip():
    x = torch.randn(1, 16, 6, 10)
    packed = sampling.pack(x)
    assert packed.shape == (1, 15, 64)
    torch.testing.assert_close(packed, FluxKontextPipeline._pack_latents(x, 1, 16, 6, 10))
    torch.testing.assert_close(sampling.unpack(packed, 6, 10), x)


def test_position_ids_match_diffusers():
    ref = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    torch.testing.assert_close(sampling.position_ids(6, 10, 0), ref)
    ctx = sampling.position_ids(6, 10, 1)
    assert (ctx[:, 0] == 1).all() and torch.equal(ctx[:, 1:], ref[:, 1:])


def test_prepare_puts_context_after_noise_with_index_1():
    ctx = torch.randn(1, 16, 4, 6)
    inputs = sampling.prepare(ctx, torch.zeros(1, 7, 32), torch.zeros(1, 32), 8, 4, seed=0)
    assert inputs.noise.shape == (1, 8, 64) and inputs.context.shape == (1, 6, 64)
    assert inputs.img_ids.shape == (14, 3)
    assert (inputs.img_ids[:8, 0] == 0).all() and (inputs.img_ids[8:, 0] == 1).all()
    assert torch.equal(inputs.txt_ids, torch.zeros(7, 3))
    torch.testing.assert_close(inputs.context, sampling.pack(ctx))


def test_noise_depends_only_on_seed():
    a = sampling.make_noise(0, (1, 16, 4, 4))
    assert torch.equal(a, sampling.make_noise(0, (1, 16, 4, 4)))
    assert not torch.equal(a, sampling.make_noise(1, (1, 16, 4, 4)))


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


def small_inputs(editor, h=8, w=8):
    txt, vec = editor.encode_prompt("make the car red")
    return sampling.prepare(torch.randn(1, 16, h, w), txt, vec, h, w, seed=0)


@pytest.mark.parametrize("level,expected", [("none", 28), ("go fast", 18), ("go really fast", 13)])
def test_denoise_calls_the_transformer_once_per_computed_step(editor, level, expected):
    counter = CallCounter(editor.c.transformer)
    inputs = small_inputs(editor)
    timesteps = sampling.get_schedule(28, inputs.noise.shape[1])
    seen = []
    with torch.inference_mode():
        out = sampling.denoise(
            editor.c.transformer,
            inputs,
            timesteps,
            2.5,
            generate_compute_step_map(level, 28),
            on_step=lambda step, computed: seen.append(computed),
        )
    assert counter.calls == expected == sum(seen)
    assert out.shape == inputs.noise.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_skipped_steps_extrapolate_only_noise_tokens(editor, monkeypatch):
    recorded = []
    real_update = sampling.TaylorSeerState.update

    def spy(self, step, output, *args):
        recorded.append(output.shape)
        return real_update(self, step, output, *args)

    monkeypatch.setattr(sampling.TaylorSeerState, "update", spy)
    inputs = small_inputs(editor)
    with torch.inference_mode():
        sampling.denoise(
            editor.c.transformer,
            inputs,
            sampling.get_schedule(8, 16),
            2.5,
            generate_compute_step_map(AccelerationLevel.GO_REALLY_FAST, 8),
        )
    assert recorded and all(shape == inputs.noise.shape for shape in recorded)


def test_denoise_rejects_a_step_map_of_the_wrong_length(editor):
    inputs = small_inputs(editor)
    with pytest.raises(ValueError, match="compute_step_map"):
        sampling.denoise(editor.c.transformer, inputs, sampling.get_schedule(8, 16), 2.5, [True] * 7)


def run_adaptive(editor, adaptive, steps=12, inputs=None):
    counter = CallCounter(editor.c.transformer)
    inputs = inputs or small_inputs(editor)
    timesteps = sampling.get_schedule(steps, inputs.noise.shape[1])
    seen = []
    with torch.inference_mode():
        out = sampling.denoise(
            editor.c.transformer,
            inputs,
            timesteps,
            2.5,
            adaptive.required_steps(steps),
            adaptive=adaptive,
            on_step=lambda step, computed: seen.append(computed),
        )
    return out, seen, counter.calls


def test_adaptive_with_threshold_zero_computes_every_step_like_level_none(editor):
    inputs = small_inputs(editor)
    out, seen, calls = run_adaptive(editor, AdaptiveConfig(threshold=0.0), inputs=inputs)
    with torch.inference_mode():
        ref = sampling.denoise(editor.c.transformer, inputs, sampling.get_schedule(12, 16), 2.5, [True] * 12)
    assert seen == [True] * 12 and calls == 12  # first-block probes are not full calls
    torch.testing.assert_close(out, ref)


def test_adaptive_skips_at_most_max_skips_in_a_row_and_protects_the_ends(editor):
    _, seen, calls = run_adaptive(editor, AdaptiveConfig(threshold=1e9, protected=2, max_skips=2))
    # protected: 0, 1 and 10, 11; step 2 has no reference yet, then skip, skip, compute, ...
    assert seen == [True, True, True, False, False, True, False, False, True, False, True, True]
    assert calls == sum(seen)


def test_first_block_residual_is_what_block_0_adds_to_the_noise_tokens(editor):
    inputs = small_inputs(editor)
    img = inputs.noise
    captured = {}

    def hook(module, args, kwargs, output):
        captured["residual"] = output[1] - kwargs["hidden_states"]

    handle = editor.c.transformer.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True)
    with torch.inference_mode():
        sampling.velocity(editor.c.transformer, inputs, img, 0.7, 2.5)
    handle.remove()
    with torch.inference_mode():
        residual = sampling.first_block_residual(editor.c.transformer, inputs, img, 0.7, 2.5)
    n = img.shape[1]
    torch.testing.assert_close(residual, captured["residual"][:, :n])
    assert not editor.c.transformer.transformer_blocks[0]._forward_hooks  # the stop hook is removed


def test_on_extrapolated_sees_every_skipped_step_before_its_euler_step(editor):
    inputs = small_inputs(editor)
    step_map = generate_compute_step_map(AccelerationLevel.GO_REALLY_FAST, 10)
    seen = []
    with torch.inference_mode():
        sampling.denoise(
            editor.c.transformer,
            inputs,
            sampling.get_schedule(10, 16),
            2.5,
            step_map,
            on_extrapolated=lambda step, t, img, v: seen.append((step, img.shape, v.shape)),
        )
    assert [s for s, _, _ in seen] == [i for i, c in enumerate(step_map) if not c]
    assert all(a == b == inputs.noise.shape for _, a, b in seen)
