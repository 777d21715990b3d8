"""TaylorSeer step caching: which steps run the transformer, and how skipped steps are filled in.

On a computed step the transformer's velocity `v` refreshes a stack of finite differences
(`dY[0] = v`, `dY[i+1] = (dY[i] - dY_prev[i]) / window`, window = steps since the last computed
step). On a skipped step `k` steps after the last computed one the velocity is extrapolated with a
truncated Taylor series, `v ≈ Σ_i dY[i] · k^i / i!`.

This recursion is exact on linear trajectories at every order. It is not exact on curved ones:
each backward difference estimates its derivative half a window in the past. Other extrapolations
(exact Newton polynomials, differences over the schedule's times) and an adaptive compute policy
were measured against it (docs/fidelity.md); they live with the measuring tools and plug into the same
seam of the denoise loop (`sampling.denoise`'s `extrapolation` and `compute` arguments).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

import torch

DEFAULT_ORDER = 1
"""Derivatives kept when nothing else says; the pipeline takes each level's order from
LEVEL_DEFAULT_ORDER. 1 (linear extrapolation) is what the public Replicate implementation runs."""

MAX_ORDER = 3


class AccelerationLevel(enum.StrEnum):
    """How many denoising steps skip the transformer (28 steps → 28 / 18 / 13 calls)."""

    NONE = "none"
    GO_FAST = "go fast"
    GO_REALLY_FAST = "go really fast"


class StepSchedule(enum.StrEnum):
    """Other step maps at the levels' call counts, which spend more of the budget on the first steps.

    On the proxy model (docs/fidelity.md, "Against the peers") each was the best of every warm-up × spacing ×
    cool-down × order tried at its call count, chosen on one set of cases, and beat its level's map on a
    held-out set: 18 calls on 16 of 16 cases (+14 dB median), 13 calls on 12 of 16 (+6 dB). The levels keep
    the seed's maps (what Replicate documents); these are offered under their own names until real weights
    confirm them. They compute fewer of the last steps than the levels do (18 calls: 3 of the last 4;
    13 calls: 1 of the last 3), which the proxy's smooth late trajectories may forgive more than FLUX.1's.
    """

    GO_FAST_FRONT_LOADED = "go fast, front-loaded"  # 28 steps: 0-6, every second step, 27 (18 calls)
    GO_REALLY_FAST_FRONT_LOADED = "go really fast, front-loaded"  # 0-4, then 6, 9, ..., 27 (13 calls)


@dataclass(frozen=True)
class _StepPattern:
    period: int  # compute one step in `period` in the middle of the schedule
    phase: int  # ... the steps whose index % period == phase
    warmup: int  # the first `warmup` steps are always computed
    cooldown: int  # and the last `cooldown` steps


_PATTERNS: dict[AccelerationLevel | StepSchedule, _StepPattern | None] = {
    AccelerationLevel.NONE: None,
    AccelerationLevel.GO_FAST: _StepPattern(period=2, phase=1, warmup=4, cooldown=4),
    AccelerationLevel.GO_REALLY_FAST: _StepPattern(period=3, phase=1, warmup=3, cooldown=3),
    StepSchedule.GO_FAST_FRONT_LOADED: _StepPattern(period=2, phase=0, warmup=6, cooldown=1),
    StepSchedule.GO_REALLY_FAST_FRONT_LOADED: _StepPattern(period=3, phase=0, warmup=5, cooldown=0),
}


LEVEL_DEFAULT_ORDER: dict[AccelerationLevel, int] = {
    AccelerationLevel.NONE: DEFAULT_ORDER,  # nothing is extrapolated
    # Measured on the proxy model (docs/fidelity.md): at `go fast` (windows of 2 steps) order 1 beat
    # orders 2 and 3 on every case; at `go really fast` (windows of 3) order 2 beat order 1 on
    # 21 of 24 cases and halved the final latents' error.
    AccelerationLevel.GO_FAST: 1,
    AccelerationLevel.GO_REALLY_FAST: 2,
}

SCHEDULE_DEFAULT_ORDER: dict[StepSchedule, int] = {
    # Chosen with the map, on the same tuning cases (docs/fidelity.md).
    StepSchedule.GO_FAST_FRONT_LOADED: 2,
    StepSchedule.GO_REALLY_FAST_FRONT_LOADED: 3,
}


SCHEDULE_NAMES = [m.value for m in (*AccelerationLevel, *StepSchedule)]
"""Every name generate_compute_step_map and default_order take: the three levels, then the other schedules."""


def default_order(name: AccelerationLevel | StepSchedule | str) -> int:
    """The TaylorSeer order a level or schedule extrapolates with when the request names none."""
    schedule = _schedule(name)
    return (
        LEVEL_DEFAULT_ORDER[schedule] if isinstance(schedule, AccelerationLevel) else SCHEDULE_DEFAULT_ORDER[schedule]
    )


def _schedule(name: AccelerationLevel | StepSchedule | str) -> AccelerationLevel | StepSchedule:
    if isinstance(name, AccelerationLevel | StepSchedule):
        return name
    try:
        return AccelerationLevel(name)
    except ValueError:
        pass
    try:
        return StepSchedule(name)
    except ValueError:
        raise ValueError(f"unknown acceleration {name!r}: one of {SCHEDULE_NAMES}") from None


def generate_compute_step_map(level: AccelerationLevel | StepSchedule | str, num_inference_steps: int) -> list[bool]:
    """One boolean per denoising step: True runs the transformer, False extrapolates.

    `none` computes every step; `go fast` computes the first and last 4 steps and every other step
    between; `go really fast` the first and last 3 and one step in three between. A StepSchedule has
    its own warm-up, spacing and cool-down.
    """
    pattern = _PATTERNS[_schedule(level)]
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if pattern is None:
        return [True] * num_inference_steps
    step_map = [i % pattern.period == pattern.phase for i in range(num_inference_steps)]
    step_map[: pattern.warmup] = [True] * min(pattern.warmup, num_inference_steps)
    if pattern.cooldown:
        step_map[-pattern.cooldown :] = [True] * min(pattern.cooldown, num_inference_steps)
    return step_map


class Extrapolator(Protocol):
    """Per-request state that fills in skipped steps from the computed ones."""

    def update(self, step: int, output: torch.Tensor, time: float) -> None:
        """Record the transformer output computed at `step` (schedule time `time`)."""

    def predict(self, step: int, time: float) -> torch.Tensor:
        """The output at skipped `step` (schedule time `time`), float32."""


class Extrapolation(Protocol):
    """A frozen description of how to extrapolate; `start()` makes the state for one request."""

    def start(self) -> Extrapolator: ...


@dataclass(frozen=True)
class TaylorSeerConfig:
    """The shipped extrapolation: the recursion above over step indices, with `order` derivatives."""

    order: int = DEFAULT_ORDER  # derivatives kept (1..MAX_ORDER)

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 1 <= self.order <= MAX_ORDER:
            raise ValueError(f"n_derivatives (the order) must be between 1 and {MAX_ORDER}, got {self.order!r}")

    def start(self) -> TaylorSeerState:
        return TaylorSeerState(self.order)


class TaylorSeerState:
    """Finite differences of the transformer output at the computed steps: factors[i] is dY[i].

    The sampler makes one per request, so nothing is shared between predictions. Factors are kept
    in float32 whatever the model's dtype, so bf16 rounding does not enter the differences.
    """

    def __init__(self, order: int = DEFAULT_ORDER):
        self.order = order
        self.factors: list[torch.Tensor] = []  # up to order+1, each shaped like the output
        self.positions: list[float] = []  # of the last order+1 computed steps, newest last
        self.last_step: int | None = None

    def position(self, step: int, time: float | None) -> float:
        """Where a step sits on the axis the differences are taken over: its index."""
        return float(step)

    def span(self, i: int, x: float) -> float:
        """What the (i+1)-th difference at position x divides by: the last window, at every order."""
        return x - self.positions[-1]

    def update(self, step: int, output: torch.Tensor, time: float | None = None) -> None:
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"steps must increase: got {step} after {self.last_step}")
        x = self.position(step, time)
        new = [output.float()]
        # Derivatives appear one per computed step, up to the order.
        for i in range(min(self.order, len(self.factors))):
            new.append((new[i] - self.factors[i]) / self.span(i, x))
        self.factors = new
        self.positions = [*self.positions, x][-(self.order + 1) :]
        self.last_step = step

    def predict(self, step: int, time: float | None = None) -> torch.Tensor:
        if self.last_step is None:
            raise RuntimeError("TaylorSeer has no computed step to extrapolate from")
        k = self.position(step, time) - self.positions[-1]
        out = self.factors[0].clone()
        for i in range(1, len(self.factors)):
            out.add_(self.factors[i], alpha=k**i / math.factorial(i))
        return out
