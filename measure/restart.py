"""A restart of the server, timed: what predict.py's setup() does, in a fresh process.

    python -m measure.restart --config full --compile-cache /tmp/flux-bench/compile-cache --jsonl out/part4.jsonl

setup() loads the weights, then flux.optimize.optimize() loads the compile artifacts an earlier process saved,
applies the accelerations, warms up what they need of the served shapes (compiling whatever the artifacts do not
cover) and saves the artifacts again. Here the full-size model is built with random weights directly on the GPU
instead of being read from disk (its time stands in for the weight load and is reported apart), and everything after
that is the server's own code. Then one edit, to show that the first request after a restart compiles nothing.

Run it in a fresh process with empty inductor and Triton caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), as
a new container starts: then only the saved artifacts can make the compiler's caches hit. The first such
process finds no artifacts (a cold start, which saves them); the next one is the warm restart. measure.kit
runs them in that order. One `restart` row per process: seconds from launch to ready (when the parent passes
its launch time in BENCH_LAUNCHED_AT), imports, build, each part of optimize(), the compiler's cache hits and
misses, and the first edit's time and recompiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from flux import clock, optimize
from flux.optimize import AccelerationConfig, Shape
from flux.pipeline import EditRequest, KontextEditor, served_shapes
from flux.taylor_seer_utils import AccelerationLevel
from measure import records, timing
from measure.records import RowWriter, environment

ENV_LAUNCHED_AT = "BENCH_LAUNCHED_AT"
"""Epoch seconds at which the parent started this process, so that interpreter start-up counts too."""

CACHE_COUNTERS = {
    "fxgraph_cache_hit": ("inductor", "fxgraph_cache_hit"),
    "fxgraph_cache_miss": ("inductor", "fxgraph_cache_miss"),
    "autograd_cache_hit": ("aot_autograd", "autograd_cache_hit"),
    "autograd_cache_miss": ("aot_autograd", "autograd_cache_miss"),
}


def _cache_counts() -> dict[str, int]:
    return {name: counters[group][key] for name, (group, key) in CACHE_COUNTERS.items()}


def parse_shapes(text: str) -> list[Shape]:
    """The served shapes optimize() picks its warm-up from: "served" gives the server's (as setup() does);
    WIDTHxHEIGHT,... gives those sizes, with a context image of the same size."""
    if text == "served":
        return served_shapes()
    return [Shape(*size, *size) for size in (timing.parse_size(t) for t in text.split(","))]


def restart(args: argparse.Namespace, writer: RowWriter) -> dict:
    """Build, then optimize() as setup() does; the meta row is written once ready (nvidia-smi takes time
    that a server would not spend)."""
    main_at = time.time()
    launched = float(os.environ[ENV_LAUNCHED_AT]) if os.environ.get(ENV_LAUNCHED_AT) else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = clock.now(device)
    components = timing.build_components(args.config, device)
    build_s = clock.now(device) - t0  # random initialisation runs on the GPU
    timing.log(f"built the {args.config} model in {build_s:.1f} s")

    transformer = components.transformer
    config = optimize.resolve(AccelerationConfig.parse(args.accelerations), device)
    backend = args.compile_backend
    found = False
    if config.compile and args.compile_cache is not None:
        found = optimize.artifact_path(args.compile_cache, transformer, config, backend).is_file()
    shapes = parse_shapes(args.shapes)
    cache_before, graphs_before = _cache_counts(), timing.graphs_compiled()
    t0 = clock.now(device)
    seconds = optimize.optimize(transformer, config, args.compile_cache, shapes=shapes, compile_backend=backend)
    setup_beyond_build_s = clock.now(device) - t0
    ready_at = time.time()
    cache = {k: v - cache_before[k] for k, v in _cache_counts().items()}
    writer.write(
        "meta",
        **environment(device),
        config=args.config,
        command=" ".join(["python -m measure.restart", *args.argv]),
        random_weights=True,
    )
    row = {
        "accelerations": config.describe(),
        "artifacts_found": found,
        "compile_cache": str(args.compile_cache) if args.compile_cache else None,
        "import_s": main_at - launched if launched else None,
        "build_s": build_s,
        "optimize_s": seconds,
        "setup_beyond_build_s": setup_beyond_build_s,
        "ready_s": ready_at - launched if launched else None,
        "shapes": len(optimize.warm_up_shapes(config, shapes)),
        "cache": cache,
        "graphs_compiled": timing.graphs_compiled() - graphs_before,
    }
    timing.log(f"ready: optimize() took {setup_beyond_build_s:.1f} s, artifacts found: {found}, cache {cache}")
    if args.edit_size:
        row["first_edit"] = first_edit(components, transformer, args.edit_size, args.steps)
    return writer.write("restart", **row)


def first_edit(components, transformer, size: tuple[int, int], steps: int) -> dict:
    """The first request after ready, at the served default level: its seconds and whether it compiled."""
    editor = KontextEditor(dataclasses.replace(components, transformer=transformer))
    level = AccelerationLevel.GO_REALLY_FAST
    request = EditRequest(
        timing.PROMPT, timing.sample_image(*size), num_inference_steps=steps, seed=0, acceleration=level
    )
    graphs = timing.graphs_compiled()
    t0 = clock.now(transformer.device)
    result = editor.edit_at_size(request, size, size)
    total = clock.now(transformer.device) - t0
    return {
        "size": list(size),
        "steps": steps,
        "level": level.value,
        "total_s": total,
        "seconds": result.seconds,
        "recompiles": timing.graphs_compiled() - graphs,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--accelerations", default="default", help="as FLUX_ACCELERATIONS (default: the server's)")
    parser.add_argument("--compile-cache", type=Path, required=True, help="where artifacts are loaded and saved")
    parser.add_argument(
        "--shapes", default="served", help="'served' (what setup() warms up) or WIDTHxHEIGHT,... to warm up"
    )
    parser.add_argument("--compile-backend", default="inductor", help="'eager' for CPU tests (no code generation)")
    parser.add_argument(
        "--edit-size", type=timing.parse_size, default=None, help="time a first edit of this size after ready"
    )
    parser.add_argument("--steps", type=int, default=28, help="steps of the first edit")
    records.add_row_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, writer = records.start(build_parser(), argv)
    with writer:
        try:
            restart(args, writer)
        except Exception as e:
            writer.write("error", stage="restart", error=f"{type(e).__name__}: {e}")
            raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
