"""Research variants of TaylorSeer, measured in docs/fidelity.md, plugged into the serving loop's own seam.

`sampling.denoise` takes an `extrapolation` (anything with `start()` returning a state with
`update()`/`predict()`) and a `compute` step map or policy. The shipped extrapolation is
`flux.taylor_seer_utils.TaylorSeerConfig`; here are the others the fidelity harness compares with it:

- `SeerVariant`: differences over the schedule's times instead of step indices (`Spacing.TIMES`),
  and Newton extrapolation (`Method.NEWTON`: the polynomial through the last order+1 outputs in
  divided-difference form, exact on polynomials up to that degree at any spacing, same memory);
- `FirstBlockPolicy`: decide per step whether to run the transformer from how much the output of its
  first block changed since the last computed step (the First Block Cache idea); skipped steps are
  extrapolated as at the fixed levels;
- `WarmupSchedule`: other compute-step maps at the same call count as the named levels (a warm-up,
  one step in `period`, a cool-down); `schedules_with_calls` lists every distinct one at a budget.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from flux import sampling
from flux.taylor_seer_utils import DEFAULT_ORDER, TaylorSeerConfig, TaylorSeerState


class Spacing(enum.StrEnum):
    """What the finite differences are taken over."""

    STEPS = "steps"  # step indices (the seed): window = steps since the last computed step
    TIMES = "times"  # the schedule's times t: window = t - t_last (uneven, since the schedule is shifted)


class Method(enum.StrEnum):
    """How skipped steps are filled in from the computed ones."""

    # The seed: dY[i+1] = (dY[i] - dY_prev[i]) / window, v ≈ Σ dY[i]·kⁱ/i!. Exact on linear
    # trajectories only; on curved ones each difference lags half a window.
    RECURSION = "recursion"
    # The polynomial through the last order+1 computed outputs, in Newton's divided-difference
    # form: exact on polynomials up to degree `order` at any spacing, with the same memory.
    NEWTON = "newton"


class NewtonState(TaylorSeerState):
    """factors[i] is the divided difference f[x_j, ..., x_{j-i}] over the last computed positions x_j
    (newest), x_{j-1}, ...; the prediction is the Newton polynomial through them."""

    def span(self, i: int, x: float) -> float:
        return x - self.positions[-1 - i]

    def predict(self, step: int, time: float | None = None) -> torch.Tensor:
        if self.last_step is None:
            raise RuntimeError("TaylorSeer has no computed step to extrapolate from")
        x = self.position(step, time)
        out = self.factors[0].clone()
        basis = 1.0  # Π (x - x_{j-m}) over the nodes used so far, newest first
        for i in range(1, len(self.factors)):
            basis *= x - self.positions[-i]
            out.add_(self.factors[i], alpha=basis)
        return out


class _OverTimes:
    """Differences over the schedule time of each step instead of its index."""

    def position(self, step: int, time: float | None) -> float:
        if time is None:
            raise ValueError("spacing 'times' needs the schedule time of each step")
        return float(time)


class RecursionOverTimes(_OverTimes, TaylorSeerState):
    pass


class NewtonOverTimes(_OverTimes, NewtonState):
    pass


_STATES = {
    (Method.RECURSION, Spacing.STEPS): TaylorSeerState,
    (Method.RECURSION, Spacing.TIMES): RecursionOverTimes,
    (Method.NEWTON, Spacing.STEPS): NewtonState,
    (Method.NEWTON, Spacing.TIMES): NewtonOverTimes,
}


@dataclass(frozen=True)
class SeerVariant:
    """An extrapolation for `sampling.denoise`. The defaults are the shipped TaylorSeerConfig's."""

    order: int = DEFAULT_ORDER
    spacing: Spacing = Spacing.STEPS
    method: Method = Method.RECURSION

    def __post_init__(self) -> None:
        TaylorSeerConfig(self.order)  # the same order check as the shipped one
        object.__setattr__(self, "spacing", Spacing(self.spacing))
        object.__setattr__(self, "method", Method(self.method))

    def start(self) -> TaylorSeerState:
        return _STATES[self.method, self.spacing](self.order)


# ---- other step maps at the same cost ---------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupSchedule:
    """A compute-step map: the first `warmup` steps, then the steps whose index % period == phase, and the
    last `cooldown` steps. The named levels are two of these (`go fast`: 4, 2, 1, 4; `go really fast`:
    3, 3, 1, 3); the warm-up and cool-down are separate here because on a smooth trajectory the early steps,
    where the velocity turns fastest, may deserve more of the budget than the late ones."""

    warmup: int
    period: int
    phase: int
    cooldown: int

    def __post_init__(self) -> None:
        if self.warmup < 1 or self.period < 1 or not 0 <= self.phase < self.period or self.cooldown < 0:
            raise ValueError(f"not a schedule: {self}")

    @property
    def name(self) -> str:
        return f"w{self.warmup} {self.phase}%{self.period} c{self.cooldown}"

    def step_map(self, num_inference_steps: int) -> list[bool]:
        """One boolean per step, True where the transformer runs."""
        n = num_inference_steps
        return [i < self.warmup or i >= n - self.cooldown or i % self.period == self.phase for i in range(n)]


def schedules_with_calls(
    calls: int,
    num_inference_steps: int,
    warmups: range = range(1, 11),
    periods: range = range(2, 5),
    cooldowns: range = range(0, 5),
) -> Iterator[WarmupSchedule]:
    """Every WarmupSchedule in the given ranges that computes exactly `calls` steps, one per distinct step
    map (the first in warm-up, period, phase, cool-down order)."""
    seen = set()
    for warmup in warmups:
        for period in periods:
            for phase in range(period):
                for cooldown in cooldowns:
                    schedule = WarmupSchedule(warmup, period, phase, cooldown)
                    step_map = tuple(schedule.step_map(num_inference_steps))
                    if sum(step_map) == calls and step_map not in seen:
                        seen.add(step_map)
                        yield schedule


# ---- the adaptive policy ---------------------------------------------------------------------------------


class _FirstBlockDone(Exception):
    def __init__(self, residual: torch.Tensor):
        self.residual = residual


def first_block_residual(
    transformer: torch.nn.Module, inputs: sampling.KontextInputs, img: torch.Tensor, t: float, guidance: float
) -> torch.Tensor:
    """What the first double-stream block adds to the noise tokens' hidden states (B, N, D).

    Runs diffusers' own forward (embedders, rotary embedding, block 0) and stops it right after the
    first block with an exception from a forward hook, so nothing of the forward is duplicated here.
    """
    n = img.shape[1]

    def stop(module, args, kwargs, output):
        raise _FirstBlockDone(output[1][:, :n] - kwargs["hidden_states"][:, :n])

    handle = transformer.transformer_blocks[0].register_forward_hook(stop, with_kwargs=True)
    try:
        transformer(**sampling.transformer_kwargs(inputs, img, t, guidance))
    except _FirstBlockDone as done:
        return done.residual
    finally:
        handle.remove()
    raise RuntimeError("the transformer returned without running its first block")


@dataclass(frozen=True)
class AdaptiveConfig:
    """Decide per step whether to run the transformer from the first block's residual.

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


class FirstBlockPolicy:
    """A `sampling.ComputePolicy` for one request: required steps are computed; every other step runs
    the first block (a probe) and is computed when its residual changed by at least the threshold
    since the last computed step, or after max_skips skips in a row."""

    def __init__(
        self,
        config: AdaptiveConfig,
        transformer: torch.nn.Module,
        inputs: sampling.KontextInputs,
        guidance: float,
        num_inference_steps: int,
    ):
        self.config = config
        self.transformer, self.inputs, self.guidance = transformer, inputs, guidance
        self.required = config.required_steps(num_inference_steps)
        self.reference: torch.Tensor | None = None  # the residual at the last probed step that computed
        self.skipped = 0
        self.probes = 0

    def should_compute(self, residual: torch.Tensor) -> bool:
        """Whether the full transformer should run, given this step's first-block residual."""
        if self.reference is None or self.skipped >= self.config.max_skips:
            return True
        change = (residual.float() - self.reference).abs().mean() / self.reference.abs().mean().clamp_min(1e-12)
        return change.item() >= self.config.threshold

    def __call__(self, step: int, t: float, latents: torch.Tensor) -> bool:
        if self.required[step]:
            return True
        residual = first_block_residual(self.transformer, self.inputs, latents, t, self.guidance)
        self.probes += 1
        computed = self.should_compute(residual)
        if computed:
            self.skipped = 0
            self.reference = residual.float()
        else:
            self.skipped += 1
        return computed
