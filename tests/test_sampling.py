import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

from flux import sampling
from flux.taylor_seer_utils import AccelerationLevel, TaylorSeerConfig, TaylorSeerState, generate_compute_step_map

SEER = TaylorSeerConfig()


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


def test_kontext_inputs_put_context_after_noise_with_index_1():
    ctx = torch.randn(1, 16, 4, 6)
    inputs = sampling.kontext_inputs(ctx, torch.zeros(1, 7, 32), torch.zeros(1, 32), 8, 4, seed=0)
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
    return sampling.kontext_inputs(torch.randn(1, 16, h, w), txt, vec, h, w, seed=0)


@pytest.mark.parametrize("level,expected", [("none", 28), ("go fast", 18), ("go really fast", 13)])
def test_denoise_calls_the_transformer_once_per_computed_step(editor, level, expected):
    counter = CallCounter(editor.components.transformer)
    inputs = small_inputs(editor)
    timesteps = sampling.get_schedule(28, inputs.noise.shape[1])
    seen = []
    with torch.inference_mode():
        out = sampling.denoise(
            editor.components.transformer,
            inputs,
            timesteps,
            2.5,
            generate_compute_step_map(level, 28),
            SEER,
            on_step=lambda step: seen.append(step.computed),
        )
    assert counter.calls == expected == sum(seen)
    assert out.shape == inputs.noise.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_skipped_steps_extrapolate_only_noise_tokens(editor, monkeypatch):
    recorded = []
    real_update = TaylorSeerState.update

    def spy(self, step, output, *args):
        recorded.append(output.shape)
        return real_update(self, step, output, *args)

    monkeypatch.setattr(TaylorSeerState, "update", spy)
    inputs = small_inputs(editor)
    with torch.inference_mode():
        sampling.denoise(
            editor.components.transformer,
            inputs,
            sampling.get_schedule(8, 16),
            2.5,
            generate_compute_step_map(AccelerationLevel.GO_REALLY_FAST, 8),
            SEER,
        )
    assert recorded and all(shape == inputs.noise.shape for shape in recorded)


def test_denoise_rejects_a_step_map_of_the_wrong_length(editor):
    inputs = small_inputs(editor)
    with pytest.raises(ValueError, match="step map"):
        sampling.denoise(editor.components.transformer, inputs, sampling.get_schedule(8, 16), 2.5, [True] * 7, SEER)


def test_on_step_sees_every_step_with_the_latents_it_started_from(editor):
    """What a fidelity probe needs: on each skipped step, the latents before its Euler step and the
    extrapolated velocity; the next step starts from latents + (t_next - t) · velocity."""
    inputs = small_inputs(editor)
    step_map = generate_compute_step_map(AccelerationLevel.GO_REALLY_FAST, 10)
    timesteps = sampling.get_schedule(10, 16)
    seen = []
    with torch.inference_mode():
        out = sampling.denoise(
            editor.components.transformer, inputs, timesteps, 2.5, step_map, SEER, on_step=seen.append
        )
    assert [s.index for s in seen] == list(range(10)) and [s.computed for s in seen] == step_map
    assert [s.t for s in seen] == timesteps[:-1]
    assert all(s.latents.shape == s.velocity.shape == inputs.noise.shape for s in seen)
    torch.testing.assert_close(seen[0].latents, inputs.noise)
    for a, b in itertools.pairwise(seen):
        torch.testing.assert_close(b.latents, a.latents + (b.t - a.t) * a.velocity)
    torch.testing.assert_close(out, seen[-1].latents + (0.0 - seen[-1].t) * seen[-1].velocity)


def test_a_compute_policy_is_asked_at_every_step(editor):
    inputs = small_inputs(editor)
    asked = []

    def every_other(step, t, latents):
        asked.append((step, t, latents.shape))
        return step % 2 == 0

    counter = CallCounter(editor.components.transformer)
    timesteps = sampling.get_schedule(6, 16)
    with torch.inference_mode():
        sampling.denoise(editor.components.transformer, inputs, timesteps, 2.5, every_other, SEER)
    assert asked == [(i, timesteps[i], inputs.noise.shape) for i in range(6)]
    assert counter.calls == 3
