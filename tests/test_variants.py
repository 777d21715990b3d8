"""The research variants of TaylorSeer (measure.variants), plugged into the serving loop's seam."""

import pytest
import torch

from flux import sampling
from flux.taylor_seer_utils import TaylorSeerConfig, generate_compute_step_map
from measure.variants import (
    AdaptiveConfig,
    FirstBlockPolicy,
    Method,
    SeerVariant,
    Spacing,
    WarmupSchedule,
    first_block_residual,
    schedules_with_calls,
)
from tests.test_sampling import CallCounter, small_inputs


def uneven_positions() -> list[float]:
    """A shifted 28-step schedule's times: the spacing TaylorSeer sees with spacing 'times'."""
    return sampling.get_schedule(28, 4096)[:-1]


def test_the_default_variant_is_the_shipped_extrapolation():
    gen = torch.Generator().manual_seed(0)
    shipped, variant = TaylorSeerConfig(order=2).start(), SeerVariant(order=2).start()
    assert type(variant) is type(shipped)
    for s in (0, 3, 6):
        value = torch.randn(4, generator=gen)
        shipped.update(s, value)
        variant.update(s, value)
    assert torch.equal(shipped.predict(8), variant.predict(8))


def test_variants_reject_bad_use():
    with pytest.raises(ValueError, match="n_derivatives"):
        SeerVariant(order=4)
    with pytest.raises(ValueError):
        SeerVariant(method="spline")
    with pytest.raises(ValueError, match="time"):
        SeerVariant(spacing=Spacing.TIMES).start().update(0, torch.zeros(1))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", list(Spacing))
def test_newton_is_exact_on_polynomials_up_to_its_order_at_any_spacing(order, spacing):
    gen = torch.Generator().manual_seed(order)
    coeffs = torch.randn(order + 1, 3, 4, generator=gen)
    times = uneven_positions()
    step_map = generate_compute_step_map("go really fast", 28)
    step_map[9] = step_map[14] = True  # uneven windows in steps too
    state = SeerVariant(order=order, spacing=spacing, method=Method.NEWTON).start()
    seen = 0
    for step, computed in enumerate(step_map):
        x = step if spacing is Spacing.STEPS else times[step]
        truth = sum(c * x**i for i, c in enumerate(coeffs.double())).float()
        if computed:
            state.update(step, truth, times[step])
            seen += 1
        elif seen > order:  # order+1 outputs determine a polynomial of degree `order`
            torch.testing.assert_close(state.predict(step, times[step]), truth, rtol=1e-4, atol=1e-4)


def test_recursion_is_not_exact_on_quadratics_but_newton_is():
    """v = s², computed every 3 steps: the recursion lags half a window, Newton is exact."""
    for method, expected in [(Method.RECURSION, 49 - 3), (Method.NEWTON, 49)]:
        state = SeerVariant(order=2, method=method).start()
        for s in (0, 3, 6):
            state.update(s, torch.tensor([float(s * s)]))
        assert state.predict(7).item() == pytest.approx(expected)


def test_times_spacing_differences_over_the_schedule_times():
    """v linear in t (not in the step index): exact with spacing 'times', not with 'steps'."""
    times = uneven_positions()
    for spacing, exact in [(Spacing.TIMES, True), (Spacing.STEPS, False)]:
        state = SeerVariant(order=1, spacing=spacing).start()
        for s in (3, 6):
            state.update(s, torch.tensor([2.0 * times[s]]), times[s])
        got = state.predict(8, times[8]).item()
        assert (got == pytest.approx(2.0 * times[8])) is exact


@pytest.mark.parametrize("order", [1, 2, 3])
def test_newton_equals_recursion_at_order_1_and_on_one_window(order):
    """At order 1 both are the line through the last two outputs; at higher orders they differ."""
    gen = torch.Generator().manual_seed(0)
    states = [SeerVariant(order=order, method=m).start() for m in Method]
    for s in (0, 2, 5, 7):
        value = torch.randn(4, generator=gen)
        for state in states:
            state.update(s, value)
    a, b = (state.predict(9) for state in states)
    assert torch.allclose(a, b) is (order == 1)


# ---- other step maps ----


@pytest.mark.parametrize(
    "level,schedule",
    [("go fast", WarmupSchedule(4, 2, 1, 4)), ("go really fast", WarmupSchedule(3, 3, 1, 3))],
)
@pytest.mark.parametrize("steps", [28, 50, 9])
def test_the_named_maps_are_warmup_schedules(level, schedule, steps):
    assert schedule.step_map(steps) == generate_compute_step_map(level, steps)


def test_a_warmup_schedule_is_warmup_then_one_in_period_then_cooldown():
    assert WarmupSchedule(7, 2, 0, 1).step_map(12) == [True] * 7 + [False, True, False, True, True]
    assert WarmupSchedule(2, 3, 2, 0).name == "w2 2%3 c0"
    for bad in [(0, 2, 0, 1), (3, 2, 2, 1), (3, 2, 0, -1)]:
        with pytest.raises(ValueError):
            WarmupSchedule(*bad)


@pytest.mark.parametrize("calls", [18, 13])
def test_schedules_with_calls_lists_each_distinct_map_of_that_cost_once(calls):
    schedules = list(schedules_with_calls(calls, 28))
    maps = [tuple(s.step_map(28)) for s in schedules]
    assert all(sum(m) == calls for m in maps) and len(set(maps)) == len(maps)
    assert tuple(generate_compute_step_map("go fast" if calls == 18 else "go really fast", 28)) in maps
    assert len(maps) > 10  # warm-up × spacing × phase × cool-down leaves plenty to choose from


# ---- the adaptive policy ----


def run_adaptive(editor, adaptive, steps=12, inputs=None):
    transformer = editor.components.transformer
    counter = CallCounter(transformer)
    inputs = inputs or small_inputs(editor)
    timesteps = sampling.get_schedule(steps, inputs.noise.shape[1])
    policy = FirstBlockPolicy(adaptive, transformer, inputs, 2.5, steps)
    seen = []
    with torch.inference_mode():
        out = sampling.denoise(
            transformer, inputs, timesteps, 2.5, policy, TaylorSeerConfig(), lambda step: seen.append(step.computed)
        )
    return out, seen, counter.calls, policy.probes


def test_adaptive_with_threshold_zero_computes_every_step_like_level_none(editor):
    inputs = small_inputs(editor)
    out, seen, calls, probes = run_adaptive(editor, AdaptiveConfig(threshold=0.0), inputs=inputs)
    with torch.inference_mode():
        ref = sampling.denoise(
            editor.components.transformer, inputs, sampling.get_schedule(12, 16), 2.5, [True] * 12, TaylorSeerConfig()
        )
    assert seen == [True] * 12 and calls == 12  # first-block probes are not full calls
    assert probes == 12 - 2 * 3  # every step but the protected ones
    torch.testing.assert_close(out, ref)


def test_adaptive_skips_at_most_max_skips_in_a_row_and_protects_the_ends(editor):
    _, seen, calls, _ = run_adaptive(editor, AdaptiveConfig(threshold=1e9, protected=2, max_skips=2))
    # protected: 0, 1 and 10, 11; step 2 has no reference yet, then skip, skip, compute, ...
    assert seen == [True, True, True, False, False, True, False, False, True, False, True, True]
    assert calls == sum(seen)


def test_first_block_residual_is_what_block_0_adds_to_the_noise_tokens(editor):
    transformer = editor.components.transformer
    inputs = small_inputs(editor)
    img = inputs.noise
    captured = {}

    def hook(module, args, kwargs, output):
        captured["residual"] = output[1] - kwargs["hidden_states"]

    handle = transformer.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True)
    with torch.inference_mode():
        sampling.velocity(transformer, inputs, img, 0.7, 2.5)
    handle.remove()
    with torch.inference_mode():
        residual = first_block_residual(transformer, inputs, img, 0.7, 2.5)
    n = img.shape[1]
    torch.testing.assert_close(residual, captured["residual"][:, :n])
    assert not transformer.transformer_blocks[0]._forward_hooks  # the stop hook is removed
