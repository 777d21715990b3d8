"""Fidelity against the peers: our TaylorSeer schedules vs the caches a user could switch on instead.

    python -m measure.fidelity --weights tests/assets/proxy --peers --threads 1 --json peers.json

At the same cost (the named levels' call budgets, 18 and 13 of 28 steps), against level `none` on the
same cases, seeds and noise:

- ours: the named levels as served; other step maps of the same cost (`WarmupSchedule` × order); the
  adaptive first-block policy (`measure.variants.FirstBlockPolicy`);
- diffusers' own hooks: TaylorSeer (lite mode: the whole transformer extrapolated), First Block Cache,
  MagCache (its ratios calibrated, with its own calibration mode, on a third set of cases);
- cache-dit (optional: requirements-peers.txt): DBCache F1B0, without and with its TaylorSeer calibrator.

How each method runs, and how its cost is counted (blocks that actually ran, priced for the proxy and for
FLUX.1): measure/peer_methods.py.

Choices are made on one case set and reported on another: for each method, budget and pricing, the
configuration with the best mean PSNR on the tuning set among those whose mean cost is within the
budget; the table reports it on a held-out set drawn with another seed.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flux import sampling
from flux.pipeline import KontextEditor
from flux.taylor_seer_utils import (
    AccelerationLevel,
    TaylorSeerConfig,
    generate_compute_step_map,
)
from measure.cases import PreparedCase, decoded, prepare_cases, psnr, rel_l2, ssim, synthetic_cases
from measure.peer_methods import (
    CACHE_DIT_REQUIREMENT,
    BlockCounter,
    CacheDitDBCache,
    Candidate,
    Cost,
    DiffusersFirstBlock,
    DiffusersMagCache,
    DiffusersTaylorSeer,
    NamedLevel,
    OurAdaptive,
    OurSchedule,
    Pricing,
    cache_dit_available,
)
from measure.variants import AdaptiveConfig, schedules_with_calls

LEVELS = (AccelerationLevel.GO_FAST, AccelerationLevel.GO_REALLY_FAST)  # their calls are the budgets
TUNING_SEED = 1234  # the cases docs/fidelity.md's variant tables (and the shipped orders) were chosen on
HELD_OUT_SEED = 4321
CALIBRATION_SEED = 9876  # MagCache's ratios
CALIBRATION_CASES = 4

# The sweeps. Fixed maps: every distinct one of exactly the budget's calls (schedules_with_calls' ranges for
# ours; the same ranges of the hook's own knobs for diffusers' TaylorSeer), at each order. Thresholds: a
# geometric grid, 0.01 to about 1.1 (neighbours 1.3× apart), wide enough to span both budgets for every
# adaptive method on the proxy, then REFINE_STEPS bisections of the threshold on the setting each method
# chose at each budget and pricing, so that a coarse grid does not leave a peer far under its budget. The
# other knobs are each method's main ones.
THRESHOLDS = tuple(round(0.01 * 1.3**i, 5) for i in range(19))
REFINE_STEPS = 4  # the threshold to within 1.3^(1/16), about 1.7 %
SERIES_PATIENCE = 2  # thresholds measured past the first one within the smallest budget in both pricings
ORDERS = (1, 2, 3)
SEER_WARMUPS = range(1, 11)
SEER_INTERVALS = range(2, 5)
SEER_COOLDOWNS = 4  # disable_cache_after_step: None or one of the last 4 steps
ADAPTIVE_PROTECTED = (2, 4)
ADAPTIVE_MAX_SKIPS = (3, 6)  # 3 cannot reach 13 calls when probes cost 1/4 of a call (the proxy pricing)
ADAPTIVE_ORDERS = (1, 2)
MAG_MAX_SKIPS = (2, 3, 4)
MAG_RETENTION = (0.1, 0.2)
DBCACHE_WARMUPS = (2, 5)
DBCACHE_MAX_CONTINUOUS = (-1, 3)  # -1: no limit (cache-dit's default)
DBCACHE_ORDERS = (None, 1, 2)  # None: no calibrator


# ---- measuring -------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One candidate on one case set: means over the cases (PSNR per case kept for paired comparisons)."""

    candidate: Candidate
    cost: Cost
    psnr: float
    psnr_min: float
    ssim: float
    latent_rel_l2: float
    per_case_psnr: list[float]

    def as_dict(self) -> dict:
        return {
            "method": self.candidate.method,
            "config": self.candidate.label,
            "calls_proxy": self.cost.proxy,
            "calls_flux": self.cost.flux,
            "psnr": self.psnr,
            "psnr_min": self.psnr_min,
            "ssim": self.ssim,
            "latent_rel_l2": self.latent_rel_l2,
            "per_case_psnr": self.per_case_psnr,
        }


@torch.inference_mode()
def evaluate(
    editor: KontextEditor,
    candidate: Candidate,
    cases: Sequence[PreparedCase],
    guidance: float = sampling.DEFAULT_GUIDANCE,
) -> Measured:
    """Run `candidate` on every case and compare each edit with the case's level-none reference."""
    steps = len(cases[0].timesteps) - 1
    costs, psnrs, ssims, rels = [], [], [], []
    with candidate.attached(editor.components.transformer, steps) as model, BlockCounter(model) as counter:
        for case in cases:
            tokens = candidate.denoise(model, case, guidance)
            costs.append(counter.take())
            latents, pixels = decoded(editor, tokens, case.inputs)
            psnrs.append(psnr(pixels, case.reference.pixels))
            ssims.append(ssim(pixels, case.reference.pixels))
            rels.append(rel_l2(latents, case.reference.latents))
    n = len(cases)
    return Measured(
        candidate,
        Cost(sum(c.proxy for c in costs) / n, sum(c.flux for c in costs) / n),
        sum(psnrs) / n,
        min(psnrs),
        sum(ssims) / n,
        sum(rels) / n,
        psnrs,
    )


@torch.inference_mode()
def calibrate_mag_ratios(editor: KontextEditor, cases: Sequence[PreparedCase]) -> tuple[float, ...]:
    """MagCache's ratios for this model, from diffusers' own calibration mode: it runs every step and prints
    the per-step ratios at the end of each edit, which a user copies into MagCacheConfig(mag_ratios=...).
    Here the printed list is read back, and the ratios are averaged over `cases` (their own seed: not the
    cases MagCache is tuned or reported on)."""
    from diffusers import MagCacheConfig

    steps = len(cases[0].timesteps) - 1
    model = copy.deepcopy(editor.components.transformer)
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    every_step, guidance = [True] * steps, sampling.DEFAULT_GUIDANCE
    runs = []
    for case in cases:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), model.cache_context("cond"):
            sampling.denoise(model, case.inputs, case.timesteps, guidance, every_step, TaylorSeerConfig())
        model._reset_stateful_cache()
        lists = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
        if not lists:
            raise RuntimeError("MagCache calibration printed no ratios")
        runs.append([float(r) for r in ast.literal_eval(lists[-1])])
    if any(len(r) != steps for r in runs):
        raise RuntimeError(f"MagCache calibration gave {[len(r) for r in runs]} ratios for {steps} steps")
    return tuple(sum(values) / len(values) for values in zip(*runs, strict=True))


def sweep(steps: int, budgets: Sequence[int], mag_ratios: Sequence[float]) -> list[list[Candidate]]:
    """Every configuration to try on the tuning set (the grids above), as series: the configurations of one
    setting by increasing threshold (a fixed-cost configuration is a series of one)."""
    series: list[list[Candidate]] = []
    for budget in budgets:
        for schedule in schedules_with_calls(budget, steps):
            series += [[OurSchedule(schedule, order)] for order in ORDERS]
        maps = set()
        cooldowns = [None, *range(steps - SEER_COOLDOWNS, steps)]
        for warmup, interval, cooldown_from in itertools.product(SEER_WARMUPS, SEER_INTERVALS, cooldowns):
            step_map = tuple(DiffusersTaylorSeer(warmup, interval, cooldown_from, 1).step_map(steps))
            if sum(step_map) == budget and step_map not in maps:
                maps.add(step_map)
                series += [[DiffusersTaylorSeer(warmup, interval, cooldown_from, order)] for order in ORDERS]
    for protected, skips, order in itertools.product(ADAPTIVE_PROTECTED, ADAPTIVE_MAX_SKIPS, ADAPTIVE_ORDERS):
        configs = [AdaptiveConfig(threshold=t, protected=protected, max_skips=skips) for t in THRESHOLDS]
        series.append([OurAdaptive(config, order) for config in configs])
    series.append([DiffusersFirstBlock(t) for t in THRESHOLDS])
    for skips, retention in itertools.product(MAG_MAX_SKIPS, MAG_RETENTION):
        series.append([DiffusersMagCache(t, skips, retention, tuple(mag_ratios)) for t in THRESHOLDS])
    for order, warmup, cont in itertools.product(DBCACHE_ORDERS, DBCACHE_WARMUPS, DBCACHE_MAX_CONTINUOUS):
        series.append([CacheDitDBCache(t, warmup, cont, order) for t in THRESHOLDS])
    return series


def measure_series(
    editor: KontextEditor, series: Sequence[Candidate], cases: Sequence[PreparedCase], budget: float
) -> list[Measured]:
    """Measure a series in order, stopping SERIES_PATIENCE configurations after the first one within `budget`
    (the smallest) in both pricings: further on, each threshold skips more, and a configuration that costs
    less and is also more faithful than its neighbours is what the patience is there to catch."""
    measured: list[Measured] = []
    fitted = None
    for i, candidate in enumerate(series):
        measured.append(evaluate(editor, candidate, cases))
        if fitted is None and max(measured[-1].cost.proxy, measured[-1].cost.flux) <= budget:
            fitted = i
        if fitted is not None and i >= fitted + SERIES_PATIENCE:
            break
    return measured


def refine(
    editor: KontextEditor, measured: Sequence[Measured], budget: float, pricing: Pricing, cases: Sequence[PreparedCase]
) -> list[Measured]:
    """REFINE_STEPS geometric bisections of the threshold between a series' last measured configuration over
    the budget and its first one within it: the configurations the grid stepped over, nearest the budget."""
    by_threshold = sorted(measured, key=lambda m: m.candidate.threshold)
    first = next((k for k, m in enumerate(by_threshold) if m.cost[pricing] <= budget), None)
    if not first:  # none within the budget, or already the lowest threshold
        return []
    template = by_threshold[first].candidate
    lo, hi = by_threshold[first - 1].candidate.threshold, template.threshold
    out = []
    for _ in range(REFINE_STEPS):
        mid = (lo * hi) ** 0.5
        out.append(evaluate(editor, template.with_threshold(mid), cases))
        lo, hi = (lo, mid) if out[-1].cost[pricing] <= budget else (mid, hi)
    return out


def choose(measured: Sequence[Measured], budget: float, pricing: Pricing) -> Measured | None:
    """The best mean PSNR among the configurations whose mean cost is within the budget (ties: lower
    latent error)."""
    fits = [m for m in measured if m.cost[pricing] <= budget + 1e-9]
    return max(fits, key=lambda m: (m.psnr, -m.latent_rel_l2), default=None)


# ---- the report ------------------------------------------------------------------------------------------


@dataclass
class PeerRow:
    """One method at one budget and pricing: the configuration chosen on the tuning set, measured on both."""

    method: str
    budget: int
    pricing: str  # a Pricing, or "both" when the method's cost does not depend on it
    tuning: Measured
    held_out: Measured
    vs_named: tuple[int, int, float]  # held out, against the named level of the budget: won, lost, median ΔdB
    vs_best_map: tuple[int, int, float]  # the same against our step map chosen at this budget

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "pricing": self.pricing,
            "vs_named_level": dict(zip(("won", "lost", "median_delta_db"), self.vs_named, strict=True)),
            "vs_best_map": dict(zip(("won", "lost", "median_delta_db"), self.vs_best_map, strict=True)),
            "tuning": self.tuning.as_dict(),
            "held_out": self.held_out.as_dict(),
        }


@dataclass
class PeersReport:
    rows: list[PeerRow]
    schedules: list[PeerRow]  # the best step maps on the tuning set, each budget, also held out
    tuning: list[Measured]  # the whole sweep
    mag_ratios: tuple[float, ...]
    skipped: list[str]  # methods not run, and what to install
    cases: int
    seconds: float

    def as_dict(self) -> dict:
        return {
            "cases_per_set": self.cases,
            "seeds": {"tuning": TUNING_SEED, "held_out": HELD_OUT_SEED, "calibration": CALIBRATION_SEED},
            "seconds": self.seconds,
            "skipped": self.skipped,
            "mag_ratios": list(self.mag_ratios),
            "rows": [r.as_dict() for r in self.rows],
            "schedules": [r.as_dict() for r in self.schedules],
            "tuning_sweep": [m.as_dict() for m in self.tuning],
        }


def level_budgets(steps: int) -> dict[int, AccelerationLevel]:
    """The call budgets compared at: each named level's calls at `steps` (28 steps: 18 and 13)."""
    return {sum(generate_compute_step_map(level, steps)): level for level in LEVELS}


NAMED = level_budgets(sampling.DEFAULT_STEPS)
BUDGETS = tuple(NAMED)  # (18, 13)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


TIE_DB = 0.01  # per-case PSNR differences smaller than this count as ties (float rounding, not quality)


def _paired(m: Measured, other: Measured) -> tuple[int, int, float]:
    """Cases won and lost against `other` (same cases, by PSNR), and the median difference in dB."""
    deltas = [a - b for a, b in zip(m.per_case_psnr, other.per_case_psnr, strict=True)]
    return sum(d >= TIE_DB for d in deltas), sum(d <= -TIE_DB for d in deltas), statistics.median(deltas)


def run_peers(
    editor: KontextEditor,
    cases: int = 16,
    size: int = 64,
    num_inference_steps: int = sampling.DEFAULT_STEPS,
    top_schedules: int = 3,
) -> PeersReport:
    """The whole comparison: calibrate MagCache, sweep every method on the tuning cases, choose per budget
    and pricing, and measure the choices on the held-out cases (`cases` each, synthetic, `size` pixels)."""
    named_levels = level_budgets(num_inference_steps)
    budgets = tuple(named_levels)
    t0 = time.perf_counter()
    sets = {
        name: prepare_cases(editor, synthetic_cases(n, size, seed), num_inference_steps)
        for name, n, seed in [
            ("tuning", cases, TUNING_SEED),
            ("held_out", cases, HELD_OUT_SEED),
            ("calibration", CALIBRATION_CASES, CALIBRATION_SEED),
        ]
    }
    ratios = calibrate_mag_ratios(editor, sets["calibration"])
    skipped = []
    series = sweep(num_inference_steps, budgets, ratios)
    if not cache_dit_available():
        skipped.append(f"cache-dit DBCache rows: cache-dit is not installed ({CACHE_DIT_REQUIREMENT})")
        series = [s for s in series if s[0].requires != "cache_dit"]
    _log(f"sweeping {sum(map(len, series))} configurations (at most) on {cases} tuning cases")

    # Each series' measurements, by series; then the threshold refined where each method chose.
    measured: list[list[Measured]] = [[] for _ in series]
    methods: dict[str, list[int]] = {}
    for i, one in enumerate(series):
        methods.setdefault(one[0].method, []).append(i)
    for method, indices in methods.items():
        start = time.perf_counter()
        for i in indices:
            measured[i] = measure_series(editor, series[i], sets["tuning"], min(budgets))
        n = sum(len(measured[i]) for i in indices)
        _log(f"  {method}: {n} configurations, {time.perf_counter() - start:.0f} s")

    def tuning_of(indices: Sequence[int]) -> list[Measured]:
        return [m for i in indices for m in measured[i]]

    start = time.perf_counter()
    for indices in methods.values():
        for budget, pricing in itertools.product(budgets, Pricing):
            pick = choose(tuning_of(indices), budget, pricing)  # the grid's choice
            i = next((i for i in indices if pick and any(m is pick for m in measured[i])), None)
            if i is not None and hasattr(pick.candidate, "threshold"):
                measured[i] += refine(editor, measured[i], budget, pricing, sets["tuning"])
    _log(f"  refining thresholds: {time.perf_counter() - start:.0f} s")
    tuning = [m for one in measured for m in one]

    held_out_cache: dict[Candidate, Measured] = {}

    def held_out(candidate: Candidate) -> Measured:
        if candidate not in held_out_cache:
            held_out_cache[candidate] = evaluate(editor, candidate, sets["held_out"])
        return held_out_cache[candidate]

    rows, schedules = [], []
    for budget in budgets:
        level = NamedLevel(named_levels[budget])
        named = held_out(level)
        best_map = held_out(choose(tuning_of(methods[OurSchedule.method]), budget, Pricing.PROXY).candidate)

        def row(method: str, pricing: str, pick: Measured, budget=budget, named=named, best_map=best_map) -> PeerRow:
            held = held_out(pick.candidate)
            return PeerRow(method, budget, pricing, pick, held, _paired(held, named), _paired(held, best_map))

        rows.append(row(level.method, "both", evaluate(editor, level, sets["tuning"])))
        for method, indices in methods.items():
            options = tuning_of(indices)
            chosen = {pricing: choose(options, budget, pricing) for pricing in Pricing}
            same = chosen[Pricing.PROXY] is chosen[Pricing.FLUX] and not series[indices[0]][0].priced_by_blocks
            for pricing in [None] if same else list(Pricing):
                pick = chosen[pricing or Pricing.PROXY]
                if pick is None:
                    skipped.append(f"{method} at {budget} calls ({pricing}): no configuration within the budget")
                else:
                    rows.append(row(method, pricing or "both", pick))
        ours = sorted(
            (m for m in tuning_of(methods[OurSchedule.method]) if m.cost.proxy == budget), key=lambda m: -m.psnr
        )
        schedules += [row(OurSchedule.method, "both", pick) for pick in ours[:top_schedules]]
    return PeersReport(rows, schedules, tuning, ratios, skipped, cases, time.perf_counter() - t0)


def format_peers_table(rows: Sequence[PeerRow]) -> str:
    """A Markdown table: the configuration chosen on the tuning set, its cost and its fidelity on both sets,
    and per held-out case against the named level and against our best step map (cases won–lost, median
    ΔPSNR dB)."""
    lines = [
        "| budget | method | priced | chosen on tuning set | calls proxy / FLUX.1 | PSNR dB tuning "
        "| PSNR dB held out (min) | SSIM | latent rel L2 | vs named level | vs best map |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        h = r.held_out
        versus = [f"{won}–{lost}, {delta:+.1f}" for won, lost, delta in (r.vs_named, r.vs_best_map)]
        lines.append(
            f"| {r.budget} | {r.method} | {r.pricing} | {h.candidate.label} | {h.cost.proxy:.1f} / {h.cost.flux:.1f} "
            f"| {r.tuning.psnr:.1f} | {h.psnr:.1f} ({h.psnr_min:.1f}) | {h.ssim:.4f} | {h.latent_rel_l2:.4f} "
            f"| {versus[0]} | {versus[1]} |"
        )
    return "\n".join(lines)
