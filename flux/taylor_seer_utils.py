"""TaylorSeer step caching: which steps run the transformer, and how skipped steps are filled in.

On a computed step the transformer's velocity `v` refreshes a stack of finite differences
(`dY[0] = v`, `dY[i+1] = (dY[i] - dY_prev[i]) / window`, window = steps since the last computed
step). On a skipped step `k` steps after the last computed one the velocity is extrapolated with a
truncated Taylor series, `v ≈ Σ_i dY[i] · k^i / i!`.

This recursion is exact on linear trajectories at every order. It is not exact on curved ones:
each backward difference estimates its derivative half a window in the past.

Variants (TaylorSeerConfig): differences over the schedule's times instead of step indices, and
Newton extrapolation (the polynomial through the last order+1 outputs, exact on polynomials up to
that degree). AdaptiveConfig decides per step from the first transformer block whether to compute.
FIDELITY.md measures them all; the shipped choice is the recursion over steps, at the order
LEVEL_DEFAULT_ORDER gives each level.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

DEFAULT_N_DERIVATIVES = 1
"""Derivatives kept when nothing else says (the library's denoise()); the pipeline takes the
level's default order from LEVEL_DEFAULT_ORDER. 1 (linear extrapolation) is what the public
Replicate implementation runs."""

MAX_N_DERIVATIVES = 3


class AccelerationLevel(enum.StrEnum):
    """How many denoising steps skip the transformer (28 steps → 28 / 18 / 13 calls)."""

    NONE = "none"
    GO_FAST = "go fast"
    GO_REALLY_FAST = "go really fast"


@dataclass(frozen=True)
class _StepPattern:
    period: int  # compute one step in `period` in the middle of the schedule
    phase: int  # ... the steps whose index % period == phase
    protected: int  # the first and last `protected` steps are always computed


_PATTERNS: dict[AccelerationLevel, _StepPattern | None] = {
    AccelerationLevel.NONE: None,
    AccelerationLevel.GO_FAST: _StepPattern(period=2, phase=1, protected=4),
    AccelerationLevel.GO_REALLY_FAST: _StepPattern(period=3, phase=1, protected=3),
}


LEVEL_DEFAULT_ORDER: dict[AccelerationLevel, int] = {
    AccelerationLevel.NONE: DEFAULT_N_DERIVATIVES,  # nothing is extrapolated
    # Measured on the proxy model (FIDELITY.md): at `go fast` (windows of 2 steps) order 1 beat
    # orders 2 and 3 on every case; at `go really fast` (windows of 3) order 2 beat order 1 on
    # 21 of 24 cases and halved the final latents' error.
    AccelerationLevel.GO_FAST: 1,
    AccelerationLevel.GO_REALLY_FAST: 2,
}


def generate_compute_step_map(level: AccelerationLevel | str, num_inference_steps: int) -> list[bool]:
    """One boolean per denoising step: True runs the transformer, False extrapolates.

    `none` computes every step; `go fast` computes the first and last 4 steps and every other step
    between; `go really fast` the first and last 3 and one step in three between.
    """
    level = AccelerationLevel(level)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    pattern = _PATTERNS[level]
    if pattern is None:
        return [True] * num_inference_steps
    step_map = [i % pattern.period == pattern.phase for i in range(num_inference_steps)]
    step_map[: pattern.protected] = [True] * min(pattern.protected, num_inference_steps)
    step_map[-pattern.protected :] = [True] * min(pattern.protected, num_inference_steps)
    return step_map


class Spacing(enum.StrEnum):
    """What the finite differences are taken over."""

    STEPS = "steps"  # step indices (the seed): window = steps since the last computed step
    TIMES = "times"  # the schedule's times t: window = t - t_last (uneven, since the schedule is shifted)


class Extrapolation(enum.StrEnum):
    """How skipped steps are filled in from the computed ones."""

    # The seed: dY[i+1] = (dY[i] - dY_prev[i]) / window, v ≈ Σ dY[i]·kⁱ/i!. Exact on linear
    # trajectories only; on curved ones each difference lags half a window.
    RECURSION = "recursion"
    # The polynomial through the last order+1 computed outputs, in Newton's divided-difference
    # form: exact on polynomials up to degree `order` at any spacing, with the same memory.
    NEWTON = "newton"


@dataclass(frozen=True)
class TaylorSeerConfig:
    """How TaylorSeer extrapolates. The defaults are the shipped behaviour (see FIDELITY.md)."""

    order: int = DEFAULT_N_DERIVATIVES  # derivatives kept (1..MAX_N_DERIVATIVES); order+1 outputs used
    spacing: Spacing = Spacing.STEPS
    method: Extrapolation = Extrapolation.RECURSION

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not 1 <= self.order <= MAX_N_DERIVATIVES:
            raise ValueError(f"n_derivatives must be between 1 and {MAX_N_DERIVATIVES}, got {self.order}")
        object.__setattr__(self, "spacing", Spacing(self.spacing))
        object.__setattr__(self, "method", Extrapolation(self.method))


@dataclass
class TaylorSeerState:
    """Finite differences of the transformer output at the computed steps.

    Create one per request (the sampler does); nothing is shared between predictions. Factors are
    kept in float32 whatever the model's dtype, so bf16 rounding does not enter the differences.

    With the recursion, factors[i] is the seed's dY[i]. With Newton, factors[i] is the divided
    difference f[x_j, ..., x_{j-i}] over the last computed positions x_j (newest), x_{j-1}, ...
    """

    config: TaylorSeerConfig = field(default_factory=TaylorSeerConfig)
    factors: list[torch.Tensor] = field(default_factory=list)  # order+1 at most, each like the output
    positions: list[float] = field(default_factory=list)  # of the last order+1 computed steps, newest last
    last_computed_step: int | None = None

    def _position(self, step: int, time: float | None) -> float:
        if self.config.spacing is Spacing.STEPS:
            return float(step)
        if time is None:
            raise ValueError("spacing 'times' needs the schedule time of each step")
        return float(time)

    def update(self, step: int, output: torch.Tensor, time: float | None = None) -> None:
        """Record the transformer output computed at `step` (schedule time `time`) and refresh the
        differences."""
        if self.last_computed_step is not None and step <= self.last_computed_step:
            raise ValueError(f"steps must increase: got {step} after {self.last_computed_step}")
        x = self._position(step, time)
        newton = self.config.method is Extrapolation.NEWTON
        new = [output.float()]
        # Derivatives appear one per computed step, up to the order.
        for i in range(min(self.config.order, len(self.factors))):
            # recursion: every level divides by the last window; Newton: by the span of its nodes
            span = x - self.positions[-1 - i] if newton else x - self.positions[-1]
            new.append((new[i] - self.factors[i]) / span)
        self.factors = new
        self.positions = [*self.positions, x][-(self.config.order + 1) :]
        self.last_computed_step = step

    def predict(self, step: int, time: float | None = None) -> torch.Tensor:
        """Extrapolate the output at `step` (schedule time `time`) from the computed ones (float32)."""
        if self.last_computed_step is None:
            raise RuntimeError("TaylorSeer has no computed step to extrapolate from")
        x = self._position(step, time)
        out = self.factors[0].clone()
        if self.config.method is Extrapolation.NEWTON:
            basis = 1.0  # Π (x - x_{j-m}) over the nodes used so far, newest first
            for i in range(1, len(self.factors)):
                basis *= x - self.positions[-i]
                out.add_(self.factors[i], alpha=basis)
        else:
            k = x - self.positions[-1]
            for i in range(1, len(self.factors)):
                out.add_(self.factors[i], alpha=k**i / math.factorial(i))
        return out


@dataclass(frozen=True)
class AdaptiveConfig:
    """Decide per step whether to run the transformer, from how much the output of its first block
    changed since the last computed step (the First Block Cache idea); skipped steps are
    extrapolated by TaylorSeer as at the fixed levels.

    The first block costs about 1/57 of a full call on the real model (19 double + 38 single
    blocks); it runs on every step that is not protected.
    """

    threshold: float = 0.1  # skip while mean|r - r_last| / mean|r_last| stays below this (r: residual)
    protected: int = 3  # the first and last `protected` steps are always computed
    max_skips: int = 3  # never skip more than this many steps in a row

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.protected < 1 or self.max_skips < 0:
            raise ValueError(f"protected must be >= 1 and max_skips >= 0, got {self.protected}, {self.max_skips}")

    def required_steps(self, num_inference_steps: int) -> list[bool]:
        """The steps that are always computed (True); the others are decided as the loop goes."""
        p = self.protected
        return [i < p or i >= num_inference_steps - p for i in range(num_inference_steps)]


@dataclass
class FirstBlockState:
    """The first block's residual at the last computed step, and the skips since then."""

    config: AdaptiveConfig
    reference: torch.Tensor | None = None
    skipped: int = 0

    def should_compute(self, residual: torch.Tensor) -> bool:
        """Whether the full transformer should run, given this step's first-block residual."""
        if self.reference is None or self.skipped >= self.config.max_skips:
            return True
        change = (residual.float() - self.reference).abs().mean() / self.reference.abs().mean().clamp_min(1e-12)
        return change.item() >= self.config.threshold

    def update(self, computed: bool, residual: torch.Tensor | None) -> None:
        """Record the step's outcome; the residual of a computed step becomes the reference."""
        if computed:
            self.skipped = 0
            if residual is not None:
                self.reference = residual.float()
        else:
            self.skipped += 1
