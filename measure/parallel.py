"""Several GPUs, one edit: the expected speed-up on paper, and its measurement on a machine with several GPUs.

    python -m measure.parallel --plan                     # expected seconds per call and per edit, degrees 1-8
    python -m measure.parallel --degrees 1,2,4,8          # on a machine with 8 GPUs (script/bench-gpu parallel)
    python -m measure.parallel --config tiny --heads 2 --degrees 1,2 --size 64x48 --compile-backend eager  # CPU

`--plan` prices one transformer call of FLUX.1 Kontext at each degree from the FLOP counts (measure.floors, at the
rates assumed for an H100: estimates, nothing measured) and the bytes each rank exchanges per call, over NVLink
and over PCIe. The measurement runs each degree in fresh processes, one per GPU: each builds the full-size
transformer with the same random weights on its own GPU, joins a process group and puts flux.parallel's context
parallelism on it exactly as the server does (its accelerations applied by flux.optimize.apply, the parallelism
in its `prepare`), then times transformer calls at each size, one with an even and one with an uneven split.
Degree 1 is the transformer alone, in the same run: the speed-up is the ratio of the two, side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flux import clock, parallel, sampling
from flux.optimize import AccelerationConfig, Shape, apply
from measure import records
from measure.floors import ASSUMED_H100, call_floor, full_config, transformer_flops
from measure.quick import ASSUMED

# ---- on paper ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """What carries the exchange between GPUs: bytes per second each GPU sends (and receives) at once."""

    name: str
    bytes_per_s: float


NVLINK_H100 = Link("NVLink 4 (H100 SXM through NVSwitch): 900 GB/s per GPU, 450 GB/s each way", 450e9)
PCIE5 = Link("PCIe 5.0 x16 (H100 PCIe, no NVLink): 64 GB/s each way", 64e9)
COLLECTIVE_LATENCY_S = 20e-6
"""Assumed fixed cost of one collective between GPUs of one machine (NCCL's launch and handshake), whatever its
size: Ulysses makes 4 per attention layer (228 per call), ring 1 (57), and rank 0 adds its broadcasts and gather."""
XDIT_FLUX_DEV = "xDiT, FLUX.1 [dev] 28 steps: 6.71 s eager on one H100, 1.63 s with Ulysses-4 + compile on four"
CACHE_DIT_FLUX = "cache-dit, FLUX.1: 9.30 s on one H100, 1.92 s on two (its step cache and compile included)"


def exchanged_bytes(
    kind: parallel.Kind, degree: int, config: dict, image_tokens: int, text_tokens: int = sampling.TEXT_TOKENS
) -> float:
    """Bytes one rank sends (and receives) inside one transformer call, bf16, per attention layer summed:
    - Ulysses: four all-to-alls (Q, K, V before the attention, its output after) of the rank's share of the
      sequence, S/D tokens × D channels, of which (D-1)/D leaves the GPU: 4 · S/D · D · 2 · (D-1)/D.
    - ring: every rank's K and V, gathered: 2 · S · D · 2 · (D-1)/D (does not shrink with the degree).
    Rank 0's broadcast of the inputs and its gather of the output add ~5 MB per call (left out: < 1 %)."""
    if degree == 1:
        return 0.0
    width = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = image_tokens + text_tokens
    layers = config["num_layers"] + config["num_single_layers"]
    leaving = (degree - 1) / degree
    if kind is parallel.Kind.ULYSSES:
        per_layer = 4 * tokens / degree * width * 2 * leaving
    else:
        per_layer = 2 * tokens * width * 2 * leaving
    return layers * per_layer


@dataclass(frozen=True)
class Estimate:
    degree: int
    kind: parallel.Kind
    megapixels: float
    compute_s: float  # per rank per call: the one-GPU call's compiled seconds over the degree
    exchanged: float  # bytes per rank per call
    link_s: dict[str, float]  # link name -> seconds of exchange per call
    call_s: dict[str, float]  # link name -> seconds per call (no overlap of exchange and compute)


def collectives(kind: parallel.Kind, degree: int, config: dict) -> int:
    """Collectives per call: Ulysses 4 all-to-alls per attention layer, ring 1 all-gather of K and V; rank 0's
    broadcast of the inputs (7 tensors) and the gather of the output."""
    if degree == 1:
        return 0
    layers = config["num_layers"] + config["num_single_layers"]
    return layers * (4 if kind is parallel.Kind.ULYSSES else 1) + 8


def estimate(
    degree: int, kind: parallel.Kind, size: tuple[int, int], links: tuple[Link, ...] = (NVLINK_H100, PCIE5)
) -> Estimate:
    """Seconds per call at `degree`, as estimates: the compiled call (ASSUMED.compiled_overhead × its floor at
    the assumed H100 rates) divided evenly over the ranks (matmuls by tokens, attention by heads or by query
    blocks), plus the exchange at the link's full rate and COLLECTIVE_LATENCY_S per collective, not overlapped
    with compute (diffusers' Ulysses and ring wait for each exchange). Left out, so optimistic: GEMMs on 1/D of the
    tokens run below the rate of the large ones, and compile's gain may differ with the collectives in the graph."""
    config = full_config()
    tokens = 2 * (size[0] // 16) * (size[1] // 16)  # match_input_image: as many context tokens as noise tokens
    one_gpu = call_floor(transformer_flops(config, tokens), ASSUMED_H100) * ASSUMED.compiled_overhead
    exchanged = exchanged_bytes(kind, degree, config, tokens)
    latency = collectives(kind, degree, config) * COLLECTIVE_LATENCY_S
    link_s = {link.name: exchanged / link.bytes_per_s + latency for link in links}
    compute = one_gpu / degree
    return Estimate(
        degree,
        kind,
        size[0] * size[1] / 2**20,
        compute,
        exchanged,
        link_s,
        {name: compute + seconds for name, seconds in link_s.items()},
    )


def plan_table(sizes=((1024, 1024), (512, 512)), degrees=(1, 2, 4, 8)) -> str:
    """The expected-speed table (markdown): per call and per edit at `go really fast` (13 calls) and `none`
    (28), rank 0's text encoding, VAE encoding and decoding (ASSUMED.other_s_per_mp) added to each edit."""
    lines = [
        "| size | degree | kind | compute s / call | MB sent per rank / call | NVLink: call s | NVLink: speed-up | "
        "PCIe: call s | PCIe: speed-up | edit s, 13 calls (NVLink) | edit s, 28 calls (NVLink) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    nv, pcie = NVLINK_H100.name, PCIE5.name
    for size in sizes:
        base = estimate(1, parallel.Kind.ULYSSES, size)
        other = ASSUMED.other_s_per_mp * size[0] * size[1] / 2**20
        for degree in degrees:
            for kind in (parallel.Kind.ULYSSES, parallel.Kind.RING) if degree > 1 else (parallel.Kind.ULYSSES,):
                e = estimate(degree, kind, size)
                lines.append(
                    f"| {size[0]}x{size[1]} | {degree} | {kind.value if degree > 1 else '-'} | {e.compute_s:.3f} | "
                    f"{e.exchanged / 1e6:.0f} | {e.call_s[nv]:.3f} | {base.call_s[nv] / e.call_s[nv]:.2f}x | "
                    f"{e.call_s[pcie]:.3f} | {base.call_s[pcie] / e.call_s[pcie]:.2f}x | "
                    f"{13 * e.call_s[nv] + other:.2f} | {28 * e.call_s[nv] + other:.2f} |"
                )
    return "\n".join(lines)


# ---- measured --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The transformer of the synthetic model, the same random weights on every rank."""
    from flux.tiny import FULL, TINY, build_transformer

    cfg = FULL if args.config == "full" else TINY
    if args.heads:
        cfg = dataclasses.replace(cfg, num_attention_heads=args.heads)
    return build_transformer(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def _inputs(transformer: torch.nn.Module, shape: Shape) -> sampling.KontextInputs:
    """Random inputs of `shape`, the same on every rank (a CPU generator)."""
    cfg, device, dtype = transformer.config, transformer.device, transformer.dtype
    generator = torch.Generator("cpu").manual_seed(0)
    channels = cfg.in_channels // 4
    contexts = [torch.randn(1, channels, h // 8, w // 8, generator=generator) for w, h in shape.contexts()]
    txt = torch.randn(1, sampling.TEXT_TOKENS, cfg.joint_attention_dim, generator=generator)
    vec = torch.randn(1, cfg.pooled_projection_dim, generator=generator)
    contexts, txt, vec = [x.to(device, dtype) for x in contexts], txt.to(device, dtype), vec.to(device, dtype)
    return sampling.kontext_inputs(contexts, txt, vec, shape.height // 8, shape.width // 8, seed=0)


def _rank_main(rank: int, degree: int, port: int, setting: str, args: argparse.Namespace, common: dict) -> None:
    """One rank of one degree: build, parallelise, apply the setting, time calls; rank 0 writes the rows."""
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // degree))
    settings = parallel.ParallelSettings(degree=degree, kind=parallel.Kind(args.kind))
    t0 = time.perf_counter()
    transformer = _build(args, device)
    build_s = time.perf_counter() - t0
    context_parallel: list[parallel.ContextParallel] = []
    prepare = None
    if degree > 1:
        store = torch.distributed.TCPStore("127.0.0.1", port, degree, rank == 0, datetime.timedelta(seconds=600))
        parallel.join_group(rank, settings, store, device)
        prepare = lambda t: context_parallel.append(parallel.ContextParallel(t, settings))  # noqa: E731
    apply(transformer, AccelerationConfig.parse(setting), compile_backend=args.compile_backend, prepare=prepare)
    writer = records.RowWriter(args.jsonl, **common) if rank == 0 else None
    for size in args.size:
        shape = Shape(size[0], size[1], *(size[2:] or size[:2]))
        inputs = _inputs(transformer, shape)
        image_tokens = sum(shape.tokens())

        kwargs = sampling.transformer_kwargs(inputs, inputs.noise, 1.0, sampling.DEFAULT_GUIDANCE)
        calls = [_timed_call(transformer, kwargs, context_parallel, device) for _ in range(args.calls + 1)]
        first_s, seconds = calls[0][0], [s for s, _ in calls[1:]]  # the first compiles, with compile on
        if writer is not None:
            torch.save(calls[-1][1].float().cpu(), _output_path(args, setting, degree, shape))
            split = parallel.split_plan(settings, transformer.config.num_attention_heads, image_tokens, 512)
            writer.write(
                "parallel",
                degree=degree,
                parallel_kind=args.kind if degree > 1 else None,
                accelerations=setting,
                size=f"{shape.width}x{shape.height}",
                context=f"{shape.context_width}x{shape.context_height}",
                image_tokens=image_tokens,
                split="-" if degree == 1 else ("uneven" if split.uneven else "even"),
                build_s=build_s,
                first_call_s=first_s,
                seconds_per_call=statistics.median(seconds),
                calls=len(seconds),
                device=str(device),
            )
    if writer is not None:
        writer.close()
    if degree > 1:
        torch.distributed.destroy_process_group()


def _timed_call(
    transformer: torch.nn.Module, kwargs: dict, context_parallel: list, device: torch.device
) -> tuple[float, torch.Tensor | None]:
    """Seconds of one call on every rank (this rank's share, the output gathered to rank 0, the device synced),
    and the whole output on rank 0."""
    t0 = clock.now(device)
    with torch.inference_mode():
        output = transformer(**kwargs)[0]
        if context_parallel:
            output = context_parallel[0].gather(output)
    return clock.now(device) - t0, output


def _output_path(args: argparse.Namespace, setting: str, degree: int, shape: Shape) -> Path:
    name = f"{setting}-{degree}-{shape.width}x{shape.height}-{shape.context_width}x{shape.context_height}.pt"
    return Path(args.work) / name.replace("+", "_").replace("=", "_")


def _compare(args: argparse.Namespace, setting: str, degree: int, writer: records.RowWriter) -> None:
    """Each size's output at `degree` against degree 1's, same setting, same weights, same inputs."""
    for size in args.size:
        shape = Shape(size[0], size[1], *(size[2:] or size[:2]))
        mine, one = _output_path(args, setting, degree, shape), _output_path(args, setting, 1, shape)
        if degree == 1 or not (mine.exists() and one.exists()):
            continue
        a, b = torch.load(one), torch.load(mine)
        writer.write(
            "parallel_check",
            degree=degree,
            accelerations=setting,
            size=f"{shape.width}x{shape.height}",
            context=f"{shape.context_width}x{shape.context_height}",
            max_abs_diff=(a - b).abs().max().item(),
            relative_l2=((a - b).norm() / a.norm()).item(),
        )


def parse_size(text: str) -> tuple[int, ...]:
    """WxH (output and context the same), or WxH:CWxCH (another context size)."""
    parts = [p.split("x") for p in text.split(":")]
    return tuple(int(v) for part in parts for v in part)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print the expected-speed table (estimates) and exit")
    parser.add_argument("--config", choices=["tiny", "full"], default="full")
    parser.add_argument("--heads", type=int, help="attention heads of the synthetic model (tiny has 1: use 2)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else cpu")
    parser.add_argument("--degrees", default="1,2,4,8", help="comma-separated; those above the GPU count are skipped")
    parser.add_argument("--kind", choices=[k.value for k in parallel.Kind], default=parallel.Kind.ULYSSES.value)
    parser.add_argument(
        "--size",
        type=parse_size,
        action="append",
        help="WxH or WxH:CWxCH (output : context), repeatable; default 1024x1024 and 1024x1024:720x1456 (uneven)",
    )
    parser.add_argument("--accelerations", default="off", help="comma-separated settings (flux.optimize specs)")
    parser.add_argument("--compile-backend", default="inductor", help="eager: dynamo's tracing without codegen")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per size (the median is reported)")
    parser.add_argument("--budget", type=float, help="seconds after which no new degree starts")
    parser.add_argument("--work", help="where the outputs compared across degrees go (default: a temporary folder)")
    records.add_row_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, writer = records.start(build_parser(), argv)
    if args.plan:
        print(f"Estimates at the rates assumed for an H100 ({ASSUMED_H100.source}), compiled calls:\n")
        print(plan_table())
        print(f"\nLinks: {NVLINK_H100.name}; {PCIE5.name}; {COLLECTIVE_LATENCY_S * 1e6:.0f} us per collective.")
        print(f"Published (the projects' own figures): {XDIT_FLUX_DEV}; {CACHE_DIT_FLUX}.")
        return 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.size = args.size or [(1024, 1024), (1024, 1024, 720, 1456)]
    args.work = args.work or tempfile.mkdtemp(prefix="flux-parallel-")
    budget = records.Budget(args.budget)
    config = f"{args.config}{f', {args.heads} heads' if args.heads else ''}"
    command = " ".join(["python -m measure.parallel", *args.argv])
    writer.write("meta", **records.environment(torch.device(args.device)), config=config, command=command)
    visible = torch.cuda.device_count() if args.device == "cuda" else None
    common = writer.common
    writer.close()
    failures = 0
    for setting in args.accelerations.split(","):
        for degree in (int(d) for d in args.degrees.split(",")):
            skip = None
            if visible is not None and degree > visible:
                skip = f"not run: {visible} GPUs visible"
            elif budget.exhausted():
                skip = f"not run: {budget.reason()}"
            if skip:
                with records.RowWriter(args.jsonl, **common) as w:
                    w.write("skipped", degree=degree, accelerations=setting, reason=skip)
                print(f"degree {degree}, {setting}: {skip}", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                torch.multiprocessing.start_processes(
                    _rank_main,
                    args=(degree, _free_port(), setting, args, common),
                    nprocs=degree,
                    start_method="spawn",
                )
            except Exception as e:  # one degree failing (memory, a driver) still leaves the others' rows
                failures += 1
                with records.RowWriter(args.jsonl, **common) as w:
                    w.write("error", degree=degree, accelerations=setting, error=f"{type(e).__name__}: {e}"[:2000])
                print(f"degree {degree}, {setting}: failed: {e}", file=sys.stderr, flush=True)
                continue
            print(f"degree {degree}, {setting}: {time.perf_counter() - t0:.1f} s", flush=True)
            with records.RowWriter(args.jsonl, **common) as w:
                _compare(args, setting, degree, w)
                for row in w.rows:
                    print(f"  {row['size']} from {row['context']}: relative L2 {row['relative_l2']:.2e} from degree 1")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
