"""What each acceleration costs in image quality: every level and TaylorSeer variant vs level none.

    python -m measure.fidelity --weights tests/assets/proxy --quick
    python -m measure.fidelity --weights weights/FLUX.1-Kontext-dev --size 1024 --json fidelity.json
    python -m measure.fidelity --weights tests/assets/proxy --peers --threads 1   # vs diffusers / cache-dit

For each edit case (prompt, context image, seed) the reference is level `none`; each variant runs
the same case from the same noise and is compared with it:

- psnr / ssim: the decoded images (pixels in [0, 1]);
- latent_rel_l2: ‖x - x_ref‖ / ‖x_ref‖ of the final latents (independent of the VAE);
- extrapolation error: on each skipped step, ‖v_extrapolated - v‖ / ‖v‖, where v is what the
  transformer would have returned at that step on the variant's own trajectory (an extra call,
  for measuring only: it does not change the trajectory and is not counted);
- calls: full transformer calls; probes: first-block runs of the adaptive level; speedup:
  steps / (calls + probes · FIRST_BLOCK_COST), the saving in transformer work on the real model.

The cases are the proxy's synthetic edit task (measure.proxy) at --size pixels, or one --image with
--prompt. Metrics are averaged over cases (extrapolation error: mean over all skipped steps, and
the max). See docs/fidelity.md for the measured table. --peers runs the slower comparison with the caches
of diffusers and cache-dit instead (measure.peers).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux import sampling
from flux.optimize import FP8_MIN_FEATURES, AccelerationConfig, apply, quantize_fp8, resolve
from flux.pipeline import KontextEditor
from flux.taylor_seer_utils import (
    LEVEL_DEFAULT_ORDER,
    SCHEDULE_DEFAULT_ORDER,
    AccelerationLevel,
    StepSchedule,
    generate_compute_step_map,
)
from measure.cases import FLUX_BLOCKS, EditCase, decoded, prepare_cases, psnr, rel_l2, ssim, synthetic_cases
from measure.variants import AdaptiveConfig, FirstBlockPolicy, Method, SeerVariant, Spacing

FIRST_BLOCK_COST = 1 / FLUX_BLOCKS  # one block of FLUX.1 (a double block costs more: a floor)


@dataclass(frozen=True)
class Variant:
    """One way to accelerate: a level (its step map) and how skipped steps are extrapolated."""

    name: str
    level: AccelerationLevel | StepSchedule
    seer: SeerVariant = SeerVariant()
    adaptive: AdaptiveConfig | None = None  # set: the first block decides every unprotected step (level unused)
    accelerations: str = "off"  # an AccelerationConfig.parse() spec applied to a copy of the transformer
    dtype: torch.dtype | None = None  # the copy's dtype; None: the editor's (fp8 implies bfloat16)


@dataclass
class FidelityRow:
    """One variant's fidelity vs level none, averaged over the cases."""

    variant: str
    level: str
    accelerations: str
    dtype: str
    order: int
    spacing: str
    method: str
    adaptive_threshold: float | None
    calls: float
    probes: float
    speedup: float
    psnr: float  # dB, mean over cases (identical images count as MAX_PSNR)
    psnr_min: float
    ssim: float
    latent_rel_l2: float
    extrapolation_error_mean: float
    extrapolation_error_max: float
    per_case_psnr: list[float] = field(default_factory=list)


def seer_variants(level: AccelerationLevel) -> list[Variant]:
    """Every extrapolation variant worth measuring at a fixed level: order 1-3, steps vs times,
    recursion vs Newton (at order 1 the two methods are the same line)."""
    out = []
    for method in Method:
        for spacing in Spacing:
            for order in (1, 2, 3):
                if method is Method.NEWTON and order == 1:
                    continue
                seer = SeerVariant(order=order, spacing=spacing, method=method)
                out.append(Variant(f"{level.value} · {method.value}/{spacing.value} o{order}", level, seer))
    return out


def adaptive_variants(seer: SeerVariant, thresholds: Sequence[float] = (0.02, 0.05, 0.1, 0.2)) -> list[Variant]:
    """The adaptive level at a few thresholds, deciding every middle step (level none's map)."""
    return [
        Variant(
            f"adaptive t={th:g} · {seer.method.value}/{seer.spacing.value} o{seer.order}",
            AccelerationLevel.NONE,
            seer,
            AdaptiveConfig(threshold=th),
        )
        for th in thresholds
    ]


def quick_variants() -> list[Variant]:
    """The quick setting (CI): the shipped configuration at each level and each named StepSchedule, and
    the adaptive level at the threshold where it makes as many calls as `go really fast`."""
    levels = [AccelerationLevel.GO_FAST, AccelerationLevel.GO_REALLY_FAST, *StepSchedule]
    shipped = [Variant(f"{level.value} · default", level, default_seer(level)) for level in levels]
    return shipped + adaptive_variants(SeerVariant(), [0.1])


def acceleration_variants(spec: str) -> list[Variant]:
    """Level none and the shipped configuration of each level, with the transformer accelerated by
    `spec` (e.g. "fp8"): what the acceleration costs on its own, and on top of TaylorSeer."""
    levels = [AccelerationLevel.NONE, AccelerationLevel.GO_FAST, AccelerationLevel.GO_REALLY_FAST]
    return [
        Variant(f"{level.value} · default · {spec}", level, default_seer(level), accelerations=spec) for level in levels
    ]


def bf16_variant() -> Variant:
    """Level none with the transformer in bfloat16: separates bf16's share of an fp8 row's error when the
    reference runs in float32 (on the CPU)."""
    return Variant("none · bf16", AccelerationLevel.NONE, dtype=torch.bfloat16)


@contextlib.contextmanager
def _torchao_fp8_on_cpu():
    """Let torchao quantise to fp8 on the CPU, for fidelity measurements only. torchao refuses unless it
    sees an fp8 GPU, but its CPU path quantises weights and activations the same way (per-row e4m3
    scales); the matmul then runs slowly, so only the numbers mean anything, never the time."""
    from torchao.quantization import quant_api

    check = quant_api._check_hardware_support
    quant_api._check_hardware_support = lambda granularity: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = check


def accelerated_copy(
    transformer: torch.nn.Module, variant: Variant, fp8_min_features: int = FP8_MIN_FEATURES
) -> torch.nn.Module:
    """A copy of `transformer` in the variant's dtype with its accelerations applied (the original
    is left as it is). fp8 on the CPU goes through _torchao_fp8_on_cpu(), without compile."""
    device = transformer.device
    config = resolve(AccelerationConfig.parse(variant.accelerations), device)
    dtype = variant.dtype or (torch.bfloat16 if config.fp8 else transformer.dtype)
    model = copy.deepcopy(transformer).to(dtype)
    if config.fp8 and device.type == "cpu":
        if config.compile:
            raise ValueError(f"{variant.accelerations!r}: fp8 fidelity on the CPU runs without compile")
        apply(model, dataclasses.replace(config, fp8=None))
        with _torchao_fp8_on_cpu():
            quantize_fp8(model, config.fp8, fp8_min_features)
    else:
        apply(model, config, fp8_min_features=fp8_min_features)
    return model


def default_seer(level: AccelerationLevel | StepSchedule) -> SeerVariant:
    """The extrapolation the pipeline uses at `level` when the request names no order (a StepSchedule:
    the order chosen with its map)."""
    orders = LEVEL_DEFAULT_ORDER if isinstance(level, AccelerationLevel) else SCHEDULE_DEFAULT_ORDER
    return SeerVariant(order=orders[level])


def all_variants() -> list[Variant]:
    variants = []
    for level in (AccelerationLevel.GO_FAST, AccelerationLevel.GO_REALLY_FAST):
        variants += seer_variants(level)
    variants += adaptive_variants(SeerVariant())
    return variants


@dataclass
class _Run:
    """One variant's edit of one case."""

    latents: torch.Tensor
    pixels: torch.Tensor  # (1, 3, H, W) in [0, 1]
    calls: int
    probes: int
    errors: list[float]


@torch.inference_mode()
def _run(
    editor: KontextEditor, transformer: torch.nn.Module, inputs, timesteps, guidance: float, variant: Variant
) -> _Run:
    """One trajectory through the serving loop (sampling.denoise) with the variant's compute policy and
    extrapolation plugged in; the progress callback is the probe that measures each extrapolation."""
    if transformer.dtype != inputs.txt.dtype:
        dtype = transformer.dtype
        inputs = dataclasses.replace(
            inputs, context=inputs.context.to(dtype), txt=inputs.txt.to(dtype), vec=inputs.vec.to(dtype)
        )
    steps = len(timesteps) - 1
    calls = 0
    errors: list[float] = []
    policy = None
    if variant.adaptive is not None:
        policy = FirstBlockPolicy(variant.adaptive, transformer, inputs, guidance, steps)
        compute, seer = policy, variant.seer
    else:
        compute, seer = generate_compute_step_map(variant.level, steps), variant.seer

    def probe(step: sampling.Step) -> None:
        nonlocal calls
        calls += step.computed
        if not step.computed:
            truth = sampling.velocity(transformer, inputs, step.latents, step.t, guidance)
            errors.append(rel_l2(step.velocity, truth))

    tokens = sampling.denoise(transformer, inputs, timesteps, guidance, compute, seer, probe)
    latents, pixels = decoded(editor, tokens, inputs)
    return _Run(latents, pixels, calls, policy.probes if policy else 0, errors)


def run_fidelity(
    editor: KontextEditor,
    variants: Sequence[Variant],
    cases: Sequence[EditCase],
    num_inference_steps: int = sampling.DEFAULT_STEPS,
    guidance: float = sampling.DEFAULT_GUIDANCE,
    fp8_min_features: int = FP8_MIN_FEATURES,
) -> list[FidelityRow]:
    """Each variant vs level none on every case (same seed, same noise): one row per variant.
    Variants with accelerations or another dtype run on a copy of the transformer, one at a time."""
    transformer = editor.components.transformer
    prepared = prepare_cases(editor, cases, num_inference_steps, guidance)

    per_variant: dict[str, list[tuple[_Run, _Run]]] = {v.name: [] for v in variants}
    groups: dict[tuple[str, torch.dtype | None], list[Variant]] = {}
    for variant in variants:
        groups.setdefault((variant.accelerations, variant.dtype), []).append(variant)
    for (spec, dtype), group in groups.items():
        off = resolve(AccelerationConfig.parse(spec), transformer.device) == AccelerationConfig()
        plain = off and dtype in (None, transformer.dtype)
        model = transformer if plain else accelerated_copy(transformer, group[0], fp8_min_features)
        for case in prepared:
            for variant in group:
                run = _run(editor, model, case.inputs, case.timesteps, guidance, variant)
                per_variant[variant.name].append((run, case.reference))
        del model

    rows = []
    for variant in variants:
        runs = per_variant[variant.name]
        psnrs = [psnr(run.pixels, ref.pixels) for run, ref in runs]
        errors = [e for run, _ in runs for e in run.errors]
        calls = sum(run.calls for run, _ in runs) / len(runs)
        probes = sum(run.probes for run, _ in runs) / len(runs)
        rows.append(
            FidelityRow(
                variant=variant.name,
                level=variant.level.value if variant.adaptive is None else "adaptive",
                accelerations=variant.accelerations,
                dtype=str(variant.dtype or transformer.dtype).removeprefix("torch."),
                order=variant.seer.order,
                spacing=variant.seer.spacing.value,
                method=variant.seer.method.value,
                adaptive_threshold=variant.adaptive.threshold if variant.adaptive else None,
                calls=calls,
                probes=probes,
                speedup=num_inference_steps / (calls + probes * FIRST_BLOCK_COST),
                psnr=sum(psnrs) / len(psnrs),
                psnr_min=min(psnrs),
                ssim=sum(ssim(run.pixels, ref.pixels) for run, ref in runs) / len(runs),
                latent_rel_l2=sum(rel_l2(run.latents, ref.latents) for run, ref in runs) / len(runs),
                extrapolation_error_mean=sum(errors) / len(errors) if errors else 0.0,
                extrapolation_error_max=max(errors, default=0.0),
                per_case_psnr=psnrs,
            )
        )
    return rows


def format_table(rows: Sequence[FidelityRow]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| variant | calls | speed-up | PSNR dB (min) | SSIM | latent rel L2 | extrap. err mean / max |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        calls = f"{r.calls:.1f}" + (f" + {r.probes:.1f} probes" if r.probes else "")
        lines.append(
            f"| {r.variant} | {calls} | {r.speedup:.2f}× | {r.psnr:.1f} ({r.psnr_min:.1f}) | {r.ssim:.4f} "
            f"| {r.latent_rel_l2:.4f} | {r.extrapolation_error_mean:.4f} / {r.extrapolation_error_max:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a diffusers-layout model directory (the proxy or real)")
    parser.add_argument(
        "--quick", action="store_true", help="the shipped defaults only (quick_variants), on 2 cases (CI)"
    )
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases (default 8, quick 2)")
    parser.add_argument("--size", type=int, default=64, help="image size of the synthetic cases, pixels")
    parser.add_argument("--image", help="one input image instead of the synthetic cases (with --prompt)")
    parser.add_argument("--prompt", help="the instruction for --image")
    parser.add_argument("--steps", type=int, default=sampling.DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0, help="seed for --image")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="the model's dtype (default: bf16 on a GPU)"
    )
    parser.add_argument(
        "--accelerations",
        default="",
        help="comma-separated AccelerationConfig specs (e.g. fp8,fp8-all): each adds level none and each level's "
        "default on an accelerated copy of the transformer; on the CPU, fp8 runs torchao's quantisation for its "
        "numbers only (needs torchao: requirements-gpu.txt)",
    )
    parser.add_argument(
        "--fp8-min-features",
        type=int,
        default=FP8_MIN_FEATURES,
        help="fp8 only for linear layers at least this wide (the server's value; the proxy's layers need 16)",
    )
    parser.add_argument("--only-accelerations", action="store_true", help="skip the TaylorSeer variants")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="instead: ours vs diffusers' and cache-dit's caches at 18 and 13 calls, each tuned on one case set "
        "and reported on a held-out one (--cases each, default 16; slow: measure.peers; cache-dit rows need "
        "requirements-peers.txt)",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (1 is fastest on a shared CPU)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    editor = KontextEditor.from_pretrained(args.weights, device=args.device, dtype=dtype)
    if args.peers:
        if args.image or args.quick or args.accelerations:
            parser.error("--peers runs on the synthetic cases, without --image, --quick or --accelerations")
        return _peers_main(editor, args)
    if args.image:
        if not args.prompt:
            parser.error("--image needs --prompt")
        from flux import images

        img = images.load_image(args.image)
        w, h = images.kontext_size(*img.size)
        cases = [EditCase(args.prompt, images.image_to_tensor(img, w, h), args.seed)]
    else:
        cases = synthetic_cases(args.cases or (2 if args.quick else 8), args.size)
    variants = [] if args.only_accelerations else quick_variants() if args.quick else all_variants()
    specs = [s.strip() for s in args.accelerations.split(",") if s.strip()]
    fp8 = any(resolve(AccelerationConfig.parse(s), editor.components.device).fp8 for s in specs)
    if fp8 and editor.components.dtype == torch.float32:
        variants.append(bf16_variant())
    for spec in specs:
        variants += acceleration_variants(spec)
    if not variants:
        parser.error("nothing to measure: --only-accelerations needs --accelerations")
    t0 = time.perf_counter()
    rows = run_fidelity(editor, variants, cases, args.steps, fp8_min_features=args.fp8_min_features)
    seconds = time.perf_counter() - t0
    print(format_table(rows))
    print(f"\n{len(cases)} cases, {args.steps} steps, {seconds:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    return 0


def _peers_main(editor: KontextEditor, args: argparse.Namespace) -> int:
    from measure import peers

    report = peers.run_peers(editor, args.cases or 16, args.size, args.steps)
    print(peers.format_peers_table(report.rows))
    print("\nBest step maps on the tuning set:\n")
    print(peers.format_peers_table(report.schedules))
    for line in report.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"\n{report.cases} + {report.cases} cases, {args.steps} steps, {report.seconds:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
