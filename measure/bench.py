"""Speed benchmark: our TaylorSeer levels × acceleration settings, against diffusers' eager
FluxKontextPipeline on the same weights in the same process, and against the arithmetic floor.

    python -m measure.bench --config tiny --steps 10 --size 64x48 --jsonl out/bench-tiny.jsonl   # CPU
    python -m measure.bench --config full --accelerations off,regional,fp8+regional --jsonl out/bench.jsonl  # GPU

`tiny` is flux.tiny's random model (CPU). `full` builds the FLUX.1 Kontext dimensions with random weights
directly on the GPU (no download): timings are real, images are noise. Every edit is match_input_image-like:
the context image and the output have the same size, so a 1024×1024 edit has 4096 noise + 4096 context +
512 text tokens.

For each acceleration setting × size × steps × level it reports seconds per phase (text, image, denoise,
decode) and end to end (median of --repeats), transformer calls, peak memory (allocated and reserved since the
setting was applied, quantisation and compilation included, and the process's since it started), compiles
during the timed runs, the cost of a skipped step relative to a computed one, and ratios to the baseline and to
the floor. The floor is transformer calls × the floor of a call (measure.floors: matmul FLOPs at the GEMM rate,
bf16 or fp8 as the setting runs them, plus attention FLOPs at the best SDPA rate, each measured in this run).

Each result is a JSON line written as soon as it is measured (measure.records), so a run stopped at a time
limit keeps what it finished; --budget makes it start nothing new after that many seconds. A setting that
cannot run on this device (fp8 on a CPU) is recorded as skipped; one that fails is recorded as an error and
the run goes on with the next. `python -m measure.bench_table FILE...` turns the lines into tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from flux import clock, optimize, sampling
from flux.optimize import AccelerationConfig, Shape
from flux.pipeline import KontextEditor, served_shapes
from flux.taylor_seer_utils import AccelerationLevel
from measure import bench_table, floors, records
from measure.records import Budget, RowWriter, environment
from measure.timing import (
    TransformerSource,
    bench_baseline,
    bench_ours,
    build_components,
    free_memory,
    graphs_compiled,
    log,
    mark_memory,
    megapixel_size,
    parse_size,
)


@dataclass(frozen=True)
class Case:
    """One size × step count: its tokens and the FLOPs of one transformer call, shared by its rows."""

    size: tuple[int, int]
    steps: int
    flops: floors.Flops

    def __str__(self) -> str:
        return f"{self.size[0]}x{self.size[1]}, {self.steps} steps"

    def fields(self) -> dict:
        n = (self.size[0] // 16) * (self.size[1] // 16)
        return {
            "size": list(self.size),
            "steps": self.steps,
            "tokens": {"noise": n, "context": n, "text": sampling.TEXT_TOKENS},
            "flops_per_call": self.flops.fields(),
        }


class Run:
    """One benchmark run: the plan from the command line, the model, and the rows written so far."""

    def __init__(self, args: argparse.Namespace, writer: RowWriter):
        self.args, self.writer = args, writer
        self.budget = Budget(args.budget)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.levels = [AccelerationLevel(level.strip()) for level in args.levels.split(",")]
        self.sizes = [megapixel_size(float(mp)) for mp in args.megapixels.split(",")] if args.megapixels else args.size
        self.steps = [int(s) for s in str(args.steps).split(",")]
        self.specs = [spec.strip() for spec in args.accelerations.split(",") if spec.strip()]
        self.baselines: dict[tuple, dict] = {}
        self.errors = 0

    def __call__(self) -> int:
        """Measure the plan, writing each row as it is measured. Returns the number of errors."""
        self._meta()
        self._build()
        for case in self.cases if self.args.baseline else []:
            self._baseline(case)
        for index, spec in enumerate(self.specs):
            if self.budget.exhausted():
                self.writer.write("skipped", accelerations=spec, reason=self.budget.reason())
                continue
            try:
                config = optimize.resolve(AccelerationConfig.parse(spec), self.device)
                config.validate(self.device)
            except ValueError as e:
                log(f"{spec}: skipped, not possible here: {e}")
                self.writer.write("skipped", accelerations=spec, reason=f"not possible here: {e}")
                continue
            self._setting(spec, config, needed_later=index < len(self.specs) - 1)
        self.writer.write("end", elapsed_s=self.budget.elapsed(), errors=self.errors)
        return self.errors

    def _meta(self) -> None:
        args = self.args
        self.writer.write(
            "meta",
            **environment(self.device),
            config=args.config,
            command=" ".join(["python -m measure.bench", *args.argv]),
            plan={
                "accelerations": self.specs,
                "levels": [level.value for level in self.levels],
                "sizes": [list(s) for s in self.sizes],
                "steps": self.steps,
                "repeats": args.repeats,
                "baseline": args.baseline,
                "step_probe": args.step_probe,
                "warm_up": args.warm_up,
                "compile_backend": args.compile_backend,
                "budget_s": args.budget,
            },
            random_weights=True,
        )

    def _build(self) -> None:
        t0 = clock.now(self.device)
        try:
            components = build_components(self.args.config, self.device)
        except Exception as e:
            self._error("build", e)
            raise
        build_s = clock.now(self.device) - t0  # random initialisation runs on the GPU
        tconfig = dict(components.transformer.config)
        self.cases = [
            Case(size, steps, floors.transformer_flops(tconfig, floors.image_tokens(size)))
            for size in self.sizes
            for steps in self.steps
        ]
        fp8 = any("fp8" in spec for spec in self.specs) and self.device.type == "cuda"
        sequences = [floors.image_tokens(c.size) + sampling.TEXT_TOKENS for c in self.cases]
        heads, head_dim = tconfig["num_attention_heads"], tconfig["attention_head_dim"]
        self.micro = floors.measure_rates(self.device, components.dtype, sequences, heads, head_dim, fp8)
        self.writer.write(
            "build",
            build_s=build_s,
            dtype=str(components.dtype),
            micro=self.micro,
            parameters={
                name: sum(p.numel() for p in getattr(components, name).parameters())
                for name in ("transformer", "text_encoder_2", "text_encoder", "vae")
            },
        )
        rates = floors.rates_from(self.micro)
        log(
            f"built the {self.args.config} model in {build_s:.1f} s; GEMM {rates.gemm / 1e12:.3g} TFLOP/s, "
            f"best SDPA {rates.sdpa / 1e12:.3g} TFLOP/s"
        )
        self.source = TransformerSource(components.transformer)
        self.components = dataclasses.replace(components, transformer=None)  # each use takes it from `source`

    def floor(self, case: Case, calls: int, fp8_scope: str | None = None) -> float:
        """Seconds of `calls` transformer calls of `case` at the rates measured in this run."""
        rates = floors.rates_from(self.micro, floors.image_tokens(case.size) + sampling.TEXT_TOKENS)
        return calls * floors.call_floor(case.flops, floors.for_setting(rates, fp8_scope), fp8_scope)

    def _error(self, stage: str, error: BaseException, **fields) -> None:
        """An error row, and the traceback in the log: the run goes on with what it can still measure."""
        traceback.print_exc(file=sys.stderr)
        self.writer.write("error", stage=stage, error=f"{type(error).__name__}: {error}", **fields)
        self.errors += 1

    def _baseline(self, case: Case) -> None:
        if self.budget.exhausted():
            self.writer.write("skipped", **case.fields(), accelerations="diffusers eager", reason=self.budget.reason())
            return
        log(f"{case}: diffusers baseline")
        try:
            components = dataclasses.replace(
                self.components, transformer=self.source.get(modifies=False, needed_later=True)
            )
            base = bench_baseline(components, case.size, case.steps, self.args.repeats)
        except Exception as e:
            self._error("diffusers baseline", e, **case.fields())
            return
        finally:
            components = None
            free_memory(self.device)
        base["floor_s"] = self.floor(case, base["transformer_calls"])
        base["ratio_to_floor"] = base["seconds"]["total"] / base["floor_s"]
        self.baselines[case.size, case.steps] = self.writer.write(
            "baseline", **case.fields(), accelerations="diffusers eager", level="none", **base
        )

    def _setting(self, spec: str, config: AccelerationConfig, needed_later: bool) -> None:
        """Every case × level of one acceleration setting, on a fresh eager transformer."""
        name = config.describe()
        torch._dynamo.reset()
        free_memory(self.device)
        # Compiled settings warm up what they need of this run's sizes before timing, or of the shapes the
        # server serves when the run times what its setup() does (optimize.warm_up_shapes).
        shapes = served_shapes() if self.args.warm_up == "served" else [Shape(*c.size, *c.size) for c in self.cases]
        log(f"{name}: applying and warming up")
        mark_memory(self.device)  # the setting's peaks: quantisation, compilation and warm-up included
        try:
            transformer = self.source.get(modifies=config != AccelerationConfig(), needed_later=needed_later)
            graphs = graphs_compiled()
            prepare = optimize.optimize(
                transformer, config, self.args.compile_cache, shapes=shapes, compile_backend=self.args.compile_backend
            )
            warm_up_compiles = graphs_compiled() - graphs
        except Exception as e:
            self._error("prepare", e, accelerations=name, spec=spec)
            return
        log(f"{name}: prepared in {sum(prepare.values()):.1f} s ({warm_up_compiles} graphs compiled)")
        editor = KontextEditor(dataclasses.replace(self.components, transformer=transformer))
        for case, level in itertools.product(self.cases, self.levels):
            if self.budget.exhausted():
                self.writer.write(
                    "skipped", **case.fields(), accelerations=name, level=level.value, reason=self.budget.reason()
                )
                continue
            log(f"{case}, {name}, {level.value}")
            try:
                r = bench_ours(editor, level, case.size, case.steps, self.args.repeats, self.args.step_probe)
            except Exception as e:
                self._error("run", e, **case.fields(), accelerations=name, level=level.value)
                free_memory(self.device)
                continue
            r["floor_s"] = self.floor(case, r["transformer_calls"], config.fp8 and config.fp8.value)
            r["ratio_to_floor"] = r["seconds"]["total"] / r["floor_s"]
            r["denoise_ratio_to_floor"] = r["seconds"]["denoise"] / r["floor_s"]
            base = self.baselines.get((case.size, case.steps))
            if base is not None:
                r["speedup_vs_baseline"] = base["seconds"]["total"] / r["seconds"]["total"]
            self.writer.write(
                "run",
                **case.fields(),
                accelerations=name,
                spec=spec,
                prepare_s=prepare,
                compiles_in_warm_up=warm_up_compiles,
                **r,
            )


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--repeats", type=int, default=3, help="timed edits per row; the median is reported")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time diffusers' eager FluxKontextPipeline on the same weights first (default: on)",
    )
    parser.add_argument(
        "--step-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one extra edit per level that skips steps, timed step by step: a skipped vs a computed step",
    )
    parser.add_argument(
        "--warm-up",
        choices=["run", "served"],
        default="run",
        help="the shapes compiled settings warm up from (flux.optimize.warm_up_shapes) before timing: this run's "
        "sizes, or the server's (as its setup() does; with --compile-cache, the artifacts a restart loads)",
    )
    parser.add_argument(
        "--compile-cache",
        type=Path,
        help="load and save compile artifacts here, as the server does (see measure.restart for a warm restart)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend; 'eager' traces and guards like inductor without generating code (CPU tests)",
    )
    parser.add_argument(
        "--budget", type=float, help="seconds after which no new row is started; the rows finished are kept"
    )
    records.add_row_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, writer = records.start(parser, argv)
    if not args.size and not args.megapixels:
        args.size = [(1024, 1024)]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    with writer:
        errors = Run(args, writer)()
    print(bench_table.render(writer.rows))
    if args.jsonl:
        log(f"wrote {len(writer.rows)} rows to {args.jsonl}")
    if errors:
        log(f"{errors} error(s): see the error rows and the tracebacks above")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
