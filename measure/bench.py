"""Speed benchmark: our TaylorSeer levels × acceleration settings, against diffusers' eager
FluxKontextPipeline on the same weights in the same process, and against the arithmetic floor.

    python -m measure.bench --config tiny --steps 10 --size 64x48 --json out/bench-tiny.json     # CPU smoke
    python -m measure.bench --config full --accelerations off,compile,fp8+compile --json out/bench.json  # GPU

`tiny` is flux.tiny's random model (CPU). `full` builds the FLUX.1 Kontext dimensions with random weights
directly on the GPU (no download): timings are real, images are noise. Every edit is match_input_image-like:
the context image and the output have the same size, so a 1024×1024 edit has 4096 noise + 4096 context +
512 text tokens.

For each size × steps × acceleration setting × level it reports seconds per phase (text, image, denoise,
decode) and end to end (median of --repeats), transformer calls, peak memory, compiles during the timed runs,
the cost of a skipped step relative to a computed one, and ratios to the baseline and to the floor. The floor
is transformer calls × FLOPs per call (from the config and token counts) / the matmul rate measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import diffusers
import PIL.Image
import torch
from torch._dynamo.utils import counters

from flux import optimize, sampling
from flux.model import FluxComponents
from flux.optimize import AccelerationConfig, Shape
from flux.pipeline import EditRequest, KontextEditor
from flux.taylor_seer_utils import AccelerationLevel, generate_compute_step_map
from flux.tiny import FULL, TINY, build_pipeline

PROMPT = "make the car red"
SEED = 0

MLP_RATIO = 4  # FluxTransformerBlock / FluxSingleTransformerBlock hard-code a 4× MLP
TIMESTEP_CHANNELS = 256  # sinusoidal timestep / guidance projections


# ---- the floor ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flops:
    """FLOPs of one transformer call: matmuls of the linear layers, and attention (QKᵀ and PV)."""

    matmul: float
    attention: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def transformer_flops(config: Mapping, image_tokens: int, text_tokens: int = sampling.TEXT_TOKENS) -> Flops:
    """FLOPs of one call of a FluxTransformer2DModel with `config`, batch 1.

    Counting: a (m × k) @ (k × n) matmul is 2·m·k·n FLOPs. D = heads × head dim, S = image + text tokens.
    - Each double-stream block runs, for the image and the text tokens (their own weights, same sizes):
      QKV (3·D²), attention output (D²) and a 4× MLP (8·D²) → 24·D² FLOPs per token; plus the modulation
      of two adaptive norms (D → 6D) on one vector each.
    - Each single-stream block, on all S tokens: QKV (3·D²), MLP in (4·D²), output of [attn | mlp]
      (5·D·D) → 24·D² per token; plus one modulation (D → 3D).
    - Attention per block: QKᵀ and PV over all heads, 2·S²·D each → 4·S²·D (no mask, no causal saving).
    - Embedders and the output layer: x (in_channels → D) per image token, context (joint dim → D) per text
      token, timestep / guidance / pooled-text MLPs and the output norm's modulation on one vector each, the
      output projection (D → in_channels) per image token.
    Norms, RoPE, activations and the residual adds are not matmuls and are left out (memory-bound, small).
    For FLUX.1 Kontext at 1024² (4096 + 4096 image tokens, 512 text tokens): ~112.4 TFLOP of matmuls and
    ~53.1 TFLOP of attention, ~165.5 TFLOP per call.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s = image_tokens + text_tokens
    mlp = MLP_RATIO * d
    double = 2 * s * (3 * d * d + d * d + 2 * d * mlp) + 2 * 2 * d * 6 * d
    single = 2 * s * (3 * d * d + d * mlp + (d + mlp) * d) + 2 * d * 3 * d
    in_ch, joint, pooled = config["in_channels"], config["joint_attention_dim"], config["pooled_projection_dim"]
    vectors = 2 * (TIMESTEP_CHANNELS * d + d * d) * (2 if config.get("guidance_embeds") else 1)
    vectors += 2 * (pooled * d + d * d) + 2 * d * 2 * d
    embed = 2 * image_tokens * in_ch * d + 2 * text_tokens * joint * d + 2 * image_tokens * d * in_ch + vectors
    blocks = config["num_layers"] + config["num_single_layers"]
    matmul = config["num_layers"] * double + config["num_single_layers"] * single + embed
    return Flops(matmul=float(matmul), attention=float(blocks * 4 * s * s * d))


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> dict:
    """FLOP/s of a matmul shaped like the transformer's MLP at 1 MP (8704 tokens, 3072 → 12288) on a GPU,
    or a 1024³ float32 matmul on the CPU. Best of several runs after a warm-up."""
    m, k, n = (8704, 3072, 12288) if device.type == "cuda" else (1024, 1024, 1024)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    runs, per_run = (10, 10) if device.type == "cuda" else (5, 1)  # several matmuls per sync on a GPU
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(per_run):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / per_run)
    return {"shape": [m, k, n], "dtype": str(dtype), "flops_per_s": 2 * m * k * n / best}


# ---- models -------------------------------------------------------------------------------------------


def build_components(config: str, device: torch.device) -> FluxComponents:
    """The components for `config` on `device`: "tiny" (flux.tiny's model, float32) or "full" (FLUX.1
    Kontext's dimensions, about 17B random parameters built directly on the GPU in bf16)."""
    if config == "tiny":
        return FluxComponents.from_pipeline(build_pipeline(TINY, device))
    if config == "full":
        if device.type != "cuda":
            raise SystemExit(
                "--config full needs a CUDA GPU: its ~17B random parameters (~34 GB in bf16) are built on the GPU. "
                "On the CPU use --config tiny."
            )
        return FluxComponents.from_pipeline(build_pipeline(FULL, device, torch.bfloat16))
    raise ValueError(f"unknown config {config!r}")


class TransformerFactory:
    """Fresh copies of one transformer's weights, so each acceleration setting starts from the same
    eager model (fusion, fp8 and compile change the module in place). The weights wait on the CPU."""

    def __init__(self, transformer: torch.nn.Module):
        self.cls, self.config = type(transformer), dict(transformer.config)
        self.device, self.dtype = transformer.device, transformer.dtype
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in transformer.state_dict().items()}

    def __call__(self) -> torch.nn.Module:
        with torch.device("meta"):
            transformer = self.cls.from_config(self.config).to(self.dtype)
        transformer = transformer.to_empty(device=self.device)
        transformer.load_state_dict(self.state)
        return transformer.eval().requires_grad_(False)


# ---- measuring ----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda allocated"}
    # ru_maxrss is the process's peak resident set (KiB on Linux) since it started: an upper bound.
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_kind": "process peak RSS",
    }


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def sample_image(width: int, height: int) -> PIL.Image.Image:
    """A deterministic gradient image (the content does not change the work done)."""
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, (x + y) / 2], dim=-1).to(torch.uint8).numpy()
    return PIL.Image.fromarray(rgb)


def step_costs(editor: KontextEditor, request: EditRequest, size: tuple[int, int]) -> dict:
    """Median seconds of a computed and of a skipped denoising step, from one extra edit timed step by step."""
    device = editor.components.device
    marks: list[tuple[float, bool]] = []

    def on_step(step: sampling.Step) -> None:
        _sync(device)
        marks.append((time.perf_counter(), step.computed))

    editor.edit_at_size(request, size, size, on_step)
    computed, skipped = [], []
    for (t_prev, _), (t, was_computed) in zip(marks, marks[1:], strict=False):
        (computed if was_computed else skipped).append(t - t_prev)
    out = {"computed_step_s": statistics.median(computed) if computed else None}
    out["skipped_step_s"] = statistics.median(skipped) if skipped else None
    if computed and skipped:
        out["skip_cost_ratio"] = out["skipped_step_s"] / out["computed_step_s"]
    return out


def bench_ours(
    editor: KontextEditor, level: AccelerationLevel, size: tuple[int, int], steps: int, repeats: int
) -> dict:
    device = editor.components.device
    request = EditRequest(PROMPT, sample_image(*size), num_inference_steps=steps, seed=SEED, acceleration=level)
    editor.edit_at_size(request, size, size)  # untimed: first-run allocations, lazy initialisation
    graphs = _graphs()
    _reset_peak(device)
    runs = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        result = editor.edit_at_size(request, size, size)
        _sync(device)
        runs.append((time.perf_counter() - t0, result))
    total, result = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    out = {
        "level": level.value,
        "seconds": {**result.seconds, "total": total},
        "transformer_calls": result.transformer_calls,
        "expected_calls": sum(generate_compute_step_map(level, steps)),
        **_peak_memory(device),
        "recompiles": _graphs() - graphs,
    }
    out.update(step_costs(editor, request, size))
    return out


def bench_baseline(components: FluxComponents, size: tuple[int, int], steps: int, repeats: int) -> dict:
    """diffusers' FluxKontextPipeline, eager, on the same weights; the context image is given at `size`."""
    c = components
    pipe = c.diffusers_pipeline()
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    hook = c.transformer.register_forward_pre_hook(count)
    width, height = size
    kwargs = dict(
        image=sample_image(width, height),
        prompt=PROMPT,
        width=width,
        height=height,
        max_area=width * height,
        num_inference_steps=steps,
        guidance_scale=sampling.DEFAULT_GUIDANCE,
        _auto_resize=False,
    )
    device = c.device
    try:
        pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(SEED))  # untimed warm-up
        _reset_peak(device)
        times = []
        for _ in range(repeats):
            calls = 0
            _sync(device)
            t0 = time.perf_counter()
            pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(SEED))
            _sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        hook.remove()
    return {"seconds": {"total": statistics.median(times)}, "transformer_calls": calls, **_peak_memory(device)}


def megapixel_size(megapixels: float) -> tuple[int, int]:
    """The square size (multiple of 16) nearest `megapixels` × 2²⁰ pixels."""
    side = max(16, round(math.sqrt(megapixels * 2**20) / 16) * 16)
    return side, side


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    size = int(w), int(h)
    if any(n <= 0 or n % 16 for n in size):
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must be positive multiples of 16")
    return size


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    components = build_components(args.config, device)
    build_s = time.perf_counter() - t0
    dtype = components.dtype
    tconfig = dict(components.transformer.config)
    factory = TransformerFactory(components.transformer)
    components.transformer = None  # each run below gets a fresh copy from the factory
    _free(device)
    settings = [optimize.resolve(AccelerationConfig.parse(spec), device) for spec in args.accelerations.split(",")]
    for config in settings:
        config.validate(device)
    levels = [AccelerationLevel(level) for level in args.levels.split(",")]
    sizes = [megapixel_size(float(mp)) for mp in args.megapixels.split(",")] if args.megapixels else args.size
    steps_list = [int(s) for s in str(args.steps).split(",")]
    matmul = measure_matmul_rate(device, dtype)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": args.config,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "command": " ".join(["python -m measure.bench", *args.argv]),
            "build_s": build_s,
            "matmul": matmul,
            "repeats": args.repeats,
            "random_weights": True,
        },
        "results": [],
    }
    for size in sizes:
        n = (size[0] // 16) * (size[1] // 16)
        flops = transformer_flops(tconfig, image_tokens=2 * n)
        for steps in steps_list:
            entry = {
                "size": list(size),
                "steps": steps,
                "tokens": {"noise": n, "context": n, "text": sampling.TEXT_TOKENS},
                "flops_per_call": dataclasses.asdict(flops) | {"total": flops.total},
            }
            log(f"{size[0]}x{size[1]}, {steps} steps: diffusers baseline")
            base = bench_baseline(dataclasses.replace(components, transformer=factory()), size, steps, args.repeats)
            base["floor_s"] = base["transformer_calls"] * flops.total / matmul["flops_per_s"]
            base["ratio_to_floor"] = base["seconds"]["total"] / base["floor_s"]
            entry["baseline"] = base
            entry["runs"] = []
            for config in settings:
                _free(device)
                torch._dynamo.reset()
                transformer = factory()
                graphs = _graphs()
                prep = optimize.optimize(transformer, config, args.compile_cache, shapes=[Shape(*size, *size)])
                warm_up_compiles = _graphs() - graphs
                editor = KontextEditor(dataclasses.replace(components, transformer=transformer))
                for level in levels:
                    log(f"{size[0]}x{size[1]}, {steps} steps: {config.describe()}, {level.value}")
                    r = bench_ours(editor, level, size, steps, args.repeats)
                    r["accelerations"] = config.describe()
                    r["prepare_s"] = prep
                    r["compiles_in_warm_up"] = warm_up_compiles
                    r["floor_s"] = r["transformer_calls"] * flops.total / matmul["flops_per_s"]
                    r["ratio_to_floor"] = r["seconds"]["total"] / r["floor_s"]
                    r["denoise_ratio_to_floor"] = r["seconds"]["denoise"] / r["floor_s"]
                    r["speedup_vs_baseline"] = base["seconds"]["total"] / r["seconds"]["total"]
                    entry["runs"].append(r)
                del editor, transformer
            report["results"].append(entry)
    return report


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def format_table(report: dict) -> str:
    """A markdown table of the report, one line per baseline and per setting × level."""
    rate = report["meta"]["matmul"]["flops_per_s"]
    lines = [
        f"matmul rate {rate / 1e12:.3g} TFLOP/s ({report['meta']['matmul']['dtype']}), {report['meta']['device']}",
        "",
        "| size | steps | accelerations | level | calls | text s | image s | denoise s | decode s | total s "
        "| × floor | speedup vs diffusers | skipped/computed step | peak GiB | recompiles | prepare s |",
        "|" + " --- |" * 16,
    ]
    gib = 2**30
    for e in report["results"]:
        size, b = f"{e['size'][0]}x{e['size'][1]}", e["baseline"]
        lines.append(
            f"| {size} | {e['steps']} | diffusers eager | none | {b['transformer_calls']} | | | | "
            f"| {b['seconds']['total']:.3f} | {b['ratio_to_floor']:.1f} | 1.00 | "
            f"| {b['peak_memory_bytes'] / gib:.2f} | | |"
        )
        for r in e["runs"]:
            s = r["seconds"]
            skip = f"{r['skip_cost_ratio']:.3f}" if r.get("skip_cost_ratio") is not None else ""
            lines.append(
                f"| {size} | {e['steps']} | {r['accelerations']} | {r['level']} | {r['transformer_calls']} "
                f"| {s['text']:.3f} | {s['image']:.3f} | {s['denoise']:.3f} | {s['decode']:.3f} | {s['total']:.3f} "
                f"| {r['ratio_to_floor']:.1f} | {r['speedup_vs_baseline']:.2f} | {skip} "
                f"| {r['peak_memory_bytes'] / gib:.2f} | {r['recompiles']} | {sum(r['prepare_s'].values()):.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--levels", default=",".join(level.value for level in AccelerationLevel))
    parser.add_argument(
        "--accelerations",
        default="off",
        help="comma-separated settings, each 'off', 'default' or names joined by '+' (see AccelerationConfig.parse)",
    )
    parser.add_argument("--steps", default="28", help="steps, or a comma-separated list for step scaling")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--size", type=parse_size, action="append", help="WIDTHxHEIGHT (repeatable); default 1024x1024")
    group.add_argument("--megapixels", help="comma-separated square sizes in megapixels, e.g. 0.25,1,2")
    parser.add_argument("--repeats", type=int, default=3, help="timed edits per setting; the median is reported")
    parser.add_argument(
        "--compile-cache",
        type=Path,
        help="persist compile artifacts here, as the server does; run twice to time a warm restart (prepare_s)",
    )
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if not args.size and not args.megapixels:
        args.size = [(1024, 1024)]
    report = run(args)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
