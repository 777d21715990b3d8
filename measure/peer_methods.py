"""What the peers table compares: each method a user could switch on (our schedules and adaptive policy, diffusers'
hooks, cache-dit), run through the serving loop as its user would run it, and the transformer work it did.

How a peer runs: as its user would run it in diffusers' pipeline, with its hooks on the transformer and one
transformer call per step, the hook deciding inside the forward what to compute. Our denoise loop is that
pipeline's loop (tests/test_parity.py pins it to FluxKontextPipeline), so every peer is driven through
`sampling.denoise` with every step "computed": same noise, schedule, conditioning and reference as our rows.
diffusers' Kontext pipeline opens no cache context, so the calls are wrapped in `transformer.cache_context("cond")`
as FluxPipeline does, and the hooks' state is reset after each edit as the pipeline does when it finishes. Each peer
runs on its own copy of the transformer, so no hook outlives it.

Cost, counted two ways from the blocks that actually ran (a pre-hook on each block's first layer, so a block that a
cache skipped is not counted): proxy, blocks run / blocks in the model, summed over an edit's calls; FLUX.1, a call
that ran every block costs 1, a partial call (a first-block probe, DBCache's Fn blocks) its blocks / 57, as one of
FLUX.1's 19 double + 38 single blocks (embedders and the output layer are not counted: small on FLUX.1).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from flux import sampling
from flux.taylor_seer_utils import (
    LEVEL_DEFAULT_ORDER,
    AccelerationLevel,
    TaylorSeerConfig,
    generate_compute_step_map,
)
from measure.cases import FLUX_BLOCKS, PreparedCase
from measure.variants import AdaptiveConfig, FirstBlockPolicy, WarmupSchedule

CACHE_DIT_REQUIREMENT = "pip install -r requirements-peers.txt  (cache-dit==1.5.3)"


class Pricing(enum.StrEnum):
    """How a partial transformer call is priced."""

    PROXY = "proxy"  # blocks run / blocks in this model
    FLUX = "FLUX.1"  # blocks run / 57 (a full call: 1)


@dataclass(frozen=True)
class Cost:
    """Transformer work per edit, in full calls."""

    proxy: float
    flux: float

    def __getitem__(self, pricing: Pricing) -> float:
        return self.proxy if pricing is Pricing.PROXY else self.flux


def _first_layer(block: torch.nn.Module) -> torch.nn.Module:
    # The norm that opens each diffusers Flux block: it runs only when the block itself runs.
    for name in ("norm1", "norm"):
        if hasattr(block, name):
            return getattr(block, name)
    raise TypeError(f"{type(block).__name__}: no norm1/norm to count the block's runs by")


class BlockCounter:
    """Counts the transformer blocks that actually run in each call of `transformer`.

    A pre-hook on the transformer opens a call; a pre-hook on each block's first layer counts the block.
    Caches that skip a block (returning a cached or extrapolated value instead) never reach its layers,
    whatever they do to the block's forward, so only real work is counted.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        self.calls: list[int] = []  # blocks run, one entry per transformer call
        self._handles: list = []

    def __enter__(self) -> BlockCounter:
        self._handles.append(self.transformer.register_forward_pre_hook(lambda module, args: self.calls.append(0)))
        for block in self.blocks:
            self._handles.append(_first_layer(block).register_forward_pre_hook(self._count))
        return self

    def _count(self, module, args) -> None:
        self.calls[-1] += 1

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take(self) -> Cost:
        """The cost of the calls since the last take()."""
        n = len(self.blocks)
        calls, self.calls = self.calls, []
        flux = sum(1.0 if run == n else run / FLUX_BLOCKS for run in calls)
        return Cost(proxy=sum(calls) / n, flux=flux)


# ---- what is compared ------------------------------------------------------------------------------------


class Candidate(ABC):
    """One configuration of one method: runs an edit and says what it is."""

    method: ClassVar[str]  # the table's row name
    priced_by_blocks: ClassVar[bool] = False  # makes partial calls (its cost depends on the pricing)
    requires: ClassVar[str | None] = None  # an optional package it needs

    @property
    @abstractmethod
    def label(self) -> str:
        """The configuration, in the method's own terms."""

    @contextlib.contextmanager
    def attached(self, transformer: torch.nn.Module, steps: int) -> Iterator[torch.nn.Module]:
        """The model to run this candidate's edits on (ours: the transformer itself)."""
        yield transformer

    @abstractmethod
    def denoise(self, model: torch.nn.Module, case: PreparedCase, guidance: float) -> torch.Tensor:
        """One edit's final tokens (B, N, 4C)."""

    def with_threshold(self, threshold: float) -> Candidate:
        """The same configuration at another threshold (for the methods with a `threshold`, the knob a
        sweep refines)."""
        return dataclasses.replace(self, threshold=threshold)


class _OurMap(Candidate):
    """Our TaylorSeer on a fixed step map."""

    order: int

    @abstractmethod
    def step_map(self, steps: int) -> list[bool]: ...

    def denoise(self, model, case, guidance):
        step_map = self.step_map(len(case.timesteps) - 1)
        return sampling.denoise(model, case.inputs, case.timesteps, guidance, step_map, TaylorSeerConfig(self.order))


@dataclass(frozen=True)
class NamedLevel(_OurMap):
    """A named level exactly as served: the seed's step map and the level's default order."""

    level: AccelerationLevel
    method: ClassVar[str] = "ours · named level"

    @property
    def order(self) -> int:
        return LEVEL_DEFAULT_ORDER[self.level]

    @property
    def label(self) -> str:
        return f"{self.level.value} (o{self.order})"

    def step_map(self, steps):
        return generate_compute_step_map(self.level, steps)


@dataclass(frozen=True)
class OurSchedule(_OurMap):
    """Our TaylorSeer on another step map of the same cost."""

    schedule: WarmupSchedule
    order: int
    method: ClassVar[str] = "ours · step map"

    @property
    def label(self) -> str:
        return f"{self.schedule.name} o{self.order}"

    def step_map(self, steps):
        return self.schedule.step_map(steps)


@dataclass(frozen=True)
class OurAdaptive(Candidate):
    """Our TaylorSeer with the first-block probe deciding which steps to compute."""

    config: AdaptiveConfig
    order: int
    method: ClassVar[str] = "ours · adaptive"
    priced_by_blocks: ClassVar[bool] = True

    @property
    def threshold(self) -> float:
        return self.config.threshold

    def with_threshold(self, threshold: float) -> OurAdaptive:
        return dataclasses.replace(self, config=dataclasses.replace(self.config, threshold=threshold))

    @property
    def label(self) -> str:
        c = self.config
        return f"t={c.threshold:.4g} protected={c.protected} max_skips={c.max_skips} o{self.order}"

    def denoise(self, model, case, guidance):
        policy = FirstBlockPolicy(self.config, model, case.inputs, guidance, len(case.timesteps) - 1)
        return sampling.denoise(model, case.inputs, case.timesteps, guidance, policy, TaylorSeerConfig(self.order))


class _HookedPeer(Candidate):
    """A cache that works inside the transformer's forward: installed on a copy of the transformer, called
    on every step (the hook decides what runs), its state reset after each edit."""

    @contextlib.contextmanager
    def attached(self, transformer, steps):
        model = copy.deepcopy(transformer)
        self.install(model, steps)
        yield model

    @abstractmethod
    def install(self, model: torch.nn.Module, steps: int) -> None: ...

    def denoise(self, model, case, guidance):
        steps = len(case.timesteps) - 1
        with self.edit(model, steps):
            # The extrapolation argument is never used: the loop itself skips no step.
            return sampling.denoise(model, case.inputs, case.timesteps, guidance, [True] * steps, TaylorSeerConfig())

    @abstractmethod
    def edit(self, model: torch.nn.Module, steps: int) -> contextlib.AbstractContextManager:
        """Around one edit: the cache's per-request context, and a fresh state for the next one."""


class _DiffusersHook(_HookedPeer):
    @abstractmethod
    def cache_config(self, steps: int): ...

    def install(self, model, steps):
        model.enable_cache(self.cache_config(steps))

    @contextlib.contextmanager
    def edit(self, model, steps):
        try:
            with model.cache_context("cond"):
                yield
        finally:
            # What the pipeline does at the end of a call (maybe_free_model_hooks): a fresh state per edit.
            model._reset_stateful_cache()


@dataclass(frozen=True)
class DiffusersTaylorSeer(_DiffusersHook):
    """diffusers' TaylorSeerCacheConfig in lite mode: the blocks are skipped and the output projection is
    extrapolated, which is what our TaylorSeer does (the default mode caches only the attention outputs and
    still runs every block's MLP, so its calls cannot be put on the same budget). Factors in float32, as in
    diffusers' own example (its default, bf16, would add rounding the float32 proxy does not have)."""

    warmup: int  # disable_cache_before_step: steps 0..warmup-1 computed
    interval: int  # cache_interval
    cooldown_from: int | None  # disable_cache_after_step: computed from this step on
    order: int  # max_order
    method: ClassVar[str] = "diffusers TaylorSeer (lite)"

    @property
    def label(self) -> str:
        return f"before={self.warmup} interval={self.interval} after={self.cooldown_from} o{self.order}"

    def step_map(self, steps: int) -> list[bool]:
        """The steps the hook computes (its documented rule; tests check it against the counted calls)."""
        return [
            s < self.warmup
            or (s - self.warmup - 1) % self.interval == 0
            or (self.cooldown_from is not None and s >= self.cooldown_from)
            for s in range(steps)
        ]

    def cache_config(self, steps):
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=self.interval,
            disable_cache_before_step=self.warmup,
            disable_cache_after_step=self.cooldown_from,
            max_order=self.order,
            taylor_factors_dtype=torch.float32,
            use_lite_mode=True,
        )


@dataclass(frozen=True)
class DiffusersFirstBlock(_DiffusersHook):
    """diffusers' First Block Cache: the first block always runs; the rest reuse their last residual while
    the first block's residual changed by less than the threshold."""

    threshold: float
    method: ClassVar[str] = "diffusers FirstBlockCache"
    priced_by_blocks: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return f"threshold={self.threshold:.4g}"

    def cache_config(self, steps):
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)


@dataclass(frozen=True)
class DiffusersMagCache(_DiffusersHook):
    """diffusers' MagCache: skips the whole transformer (reusing its last residual) while the accumulated
    error predicted from the calibrated magnitude ratios stays under the threshold."""

    threshold: float
    max_skip_steps: int
    retention_ratio: float
    ratios: tuple[float, ...] = field(repr=False)  # from calibrate_mag_ratios(), one per step
    method: ClassVar[str] = "diffusers MagCache"

    @property
    def label(self) -> str:
        return f"threshold={self.threshold:.4g} K={self.max_skip_steps} retention={self.retention_ratio:g}"

    def cache_config(self, steps):
        from diffusers import MagCacheConfig

        return MagCacheConfig(
            threshold=self.threshold,
            max_skip_steps=self.max_skip_steps,
            retention_ratio=self.retention_ratio,
            num_inference_steps=steps,
            mag_ratios=list(self.ratios),
        )


def cache_dit_available() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


def _import_cache_dit():
    # cache-dit logs every hook it installs at INFO; keep the table readable unless the user asked.
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit

    return cache_dit


@dataclass(frozen=True)
class CacheDitDBCache(_HookedPeer):
    """cache-dit's DBCache with F1B0 (the first block computes the probe, no tail blocks: the setting its
    docs give as the fastest; on the 4-block proxy a larger Fn would be half the model), optionally with its
    TaylorSeer calibrator. Transformer-only use, as cache-dit documents it: the context is refreshed for
    each request."""

    threshold: float  # residual_diff_threshold
    warmup: int  # max_warmup_steps
    max_continuous: int  # max_continuous_cached_steps (-1: no limit)
    order: int | None  # the TaylorSeer calibrator's order; None: no calibrator
    priced_by_blocks: ClassVar[bool] = True
    requires: ClassVar[str | None] = "cache_dit"

    @property
    def method(self) -> str:  # type: ignore[override]
        return "cache-dit DBCache F1B0" + ("" if self.order is None else " + TaylorSeer")

    @property
    def label(self) -> str:
        calibrator = "" if self.order is None else f" o{self.order}"
        return f"threshold={self.threshold:.4g} warmup={self.warmup} max_cont={self.max_continuous}{calibrator}"

    def install(self, model, steps):
        cache_dit = _import_cache_dit()
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1,
            Bn_compute_blocks=0,
            residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup,
            max_continuous_cached_steps=self.max_continuous,
            num_inference_steps=steps,
        )
        calibrator = None if self.order is None else cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.order)
        cache_dit.enable_cache(model, cache_config=config, calibrator_config=calibrator)

    @contextlib.contextmanager
    def edit(self, model, steps):
        _import_cache_dit().refresh_context(model, num_inference_steps=steps)
        yield
