import math

import pytest
import torch

from flux.taylor_seer_utils import AccelerationLevel, TaylorSeerConfig, TaylorSeerState, generate_compute_step_map


def seed_rule(level: str, n: int) -> list[bool]:
    """The rule as published for Replicate's implementation, written out independently."""
    if level == "none":
        return [True] * n
    if level == "go fast":
        m = [[False, True][i % 2] for i in range(n)]
        m[:4] = [True] * 4
        m[-4:] = [True] * 4
        return m
    m = [[False, True, False][i % 3] for i in range(n)]
    m[:3] = [True] * 3
    m[-3:] = [True] * 3
    return m


@pytest.mark.parametrize("level", list(AccelerationLevel))
def test_step_maps_follow_the_published_rule_for_every_step_count(level):
    for n in range(4, 51):
        assert generate_compute_step_map(level, n) == seed_rule(level.value, n), n


def test_step_map_counts_at_28_steps():
    counts = {level.value: sum(generate_compute_step_map(level, 28)) for level in AccelerationLevel}
    assert counts == {"none": 28, "go fast": 18, "go really fast": 13}


def test_levels_are_the_three_published_names_only():
    assert [level.value for level in AccelerationLevel] == ["none", "go fast", "go really fast"]
    with pytest.raises(ValueError):
        generate_compute_step_map("go ludicrously fast", 28)


def reference_extrapolation(history: list[tuple[int, torch.Tensor]], n: int, step: int) -> torch.Tensor:
    """The published recursion computed from the whole history of computed steps, without state:
    d[j][0] = v_j, d[j][i+1] = (d[j][i] - d[j-1][i]) / (s_j - s_{j-1}), defined while j >= i+1."""

    def d(j: int, i: int) -> torch.Tensor:
        if i == 0:
            return history[j][1].double()
        return (d(j, i - 1) - d(j - 1, i - 1)) / (history[j][0] - history[j - 1][0])

    last = len(history) - 1
    k = step - history[last][0]
    return sum(d(last, i) * k**i / math.factorial(i) for i in range(min(n, last) + 1))


@pytest.mark.parametrize("n_derivatives", [1, 2, 3])
@pytest.mark.parametrize("level", [AccelerationLevel.GO_FAST, AccelerationLevel.GO_REALLY_FAST])
def test_state_reproduces_the_published_formulas(n_derivatives, level):
    gen = torch.Generator().manual_seed(n_derivatives)
    step_map = generate_compute_step_map(level, 28)
    # uneven windows too: mark a few middle steps computed to vary the spacing
    step_map[9] = step_map[14] = True
    state = TaylorSeerConfig(order=n_derivatives).start()
    history = []
    checked = 0
    for step, computed in enumerate(step_map):
        if computed:
            value = torch.randn(2, 5, 4, generator=gen)
            history.append((step, value))
            state.update(step, value)
        else:
            expected = reference_extrapolation(history, n_derivatives, step)
            torch.testing.assert_close(state.predict(step).double(), expected, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == step_map.count(False) > 0


@pytest.mark.parametrize("n_derivatives", [1, 2, 3])
def test_exact_on_linear_trajectories(n_derivatives):
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    state = TaylorSeerConfig(order=n_derivatives).start()
    for step, computed in enumerate(generate_compute_step_map("go really fast", 28)):
        truth = a + b * step
        if computed:
            state.update(step, truth)
        else:
            torch.testing.assert_close(state.predict(step), truth, rtol=1e-5, atol=1e-5)


def test_not_exact_on_curved_trajectories():
    """v = s², computed every 3 steps: the order-2 recursion lags by half a window, so it is off
    by window · k. (Exact polynomial extrapolation would get this right.)"""
    state = TaylorSeerConfig(order=2).start()
    for s in (0, 3, 6):
        state.update(s, torch.tensor([float(s * s)]))
    assert state.predict(7).item() == pytest.approx(49 - 3 * 1)
    assert state.predict(8).item() == pytest.approx(64 - 3 * 2)


def test_derivatives_grow_one_per_computed_step_up_to_the_order():
    state = TaylorSeerConfig(order=2).start()
    sizes = []
    for s in range(4):
        state.update(s, torch.zeros(1))
        sizes.append(len(state.factors))
    assert sizes == [1, 2, 3, 3]


def test_state_rejects_bad_use():
    with pytest.raises(ValueError, match="n_derivatives"):
        TaylorSeerConfig(order=4)
    with pytest.raises(ValueError, match="n_derivatives"):
        TaylorSeerConfig(order=0)
    state = TaylorSeerState()
    with pytest.raises(RuntimeError):
        state.predict(0)
    state.update(3, torch.zeros(1))
    with pytest.raises(ValueError, match="increase"):
        state.update(3, torch.zeros(1))


def test_each_start_is_a_fresh_state():
    config = TaylorSeerConfig(order=2)
    a = config.start()
    a.update(0, torch.ones(1))
    b = config.start()
    assert b is not a and b.factors == [] and b.last_step is None
