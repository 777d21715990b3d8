"""The headline figures in one process on one GPU: the main part of `script/bench-gpu quick` (measure.kit).

    python -m measure.quick --config full --jsonl out/quick.jsonl --budget 360     # on a GPU
    python -m measure.quick --config tiny --compile-backend eager --steps 10 --size 64x48 --large-size 96x96
    python -m measure.quick --plan                                                  # predicted time on an H100

The full-size model is built once with random weights on the GPU; then, in this order of priority (what a
window cut short must still have):

 1. microbenchmarks: the bf16 GEMM, SDPA with each backend at the served token counts (0.25 / 1 / 2 MP), the
    fp8 GEMM: the rates of the floor (measure.floors);
 2. eager, 1024²: ours at `none` and `go really fast`, then diffusers' FluxKontextPipeline, timed once with no
    untimed run before it (ours ran first on the same weights, so nothing is cold);
 3. regional compile by the server's own optimize(): a cold setup (compile, warm-up, artifacts saved for the
    warm restart measure.kit runs in a fresh process after this one);
 4. compiled `none` and `go really fast` (with the cost of a skipped step);
 5. fp8 linear layers in the single-stream blocks, then in all blocks, at `go really fast`, with peak memory;
 6. `go really fast` at the large size (2 MP), with what is applied by then;
 7. an attention backend (cuDNN's) on top, at `go really fast`, only if time is left.

Settings are applied cumulatively to the one transformer, in place: a row runs with every setting before it
(its `accelerations` say which), and nothing is copied (24 GB would cross PCIe twice per setting). Before each
row its time is predicted from the seconds per call measured so far (the floor times an assumed overhead until
then); a row that would not end within --budget is written as skipped, with its prediction. Every row is a JSON
line written as it is measured, with what it was predicted to take and what it took.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from flux import clock, optimize, sampling
from flux.optimize import AccelerationConfig, CompileScope, Fp8Scope, Shape
from flux.pipeline import KontextEditor
from flux.taylor_seer_utils import AccelerationLevel, generate_compute_step_map
from measure import bench, bench_table, floors, records, timing
from measure.records import Budget, RowWriter, environment

NONE, FASTEST = AccelerationLevel.NONE, AccelerationLevel.GO_REALLY_FAST
GPU_SIZE, GPU_LARGE_SIZE = (1024, 1024), (1456, 1456)  # 1 and 2 MP
WARM_STEPS = 4  # the untimed first edit: lazy initialisation (cuBLAS, cuDNN, the allocator) before any timing


@dataclass(frozen=True)
class Assumptions:
    """What the plan assumes before the run measures it (each is replaced by the measured value as soon as
    there is one). For an H100; the CPU smoke run's own figures replace them as it goes."""

    build_s: float = 45.0  # interpreter, imports, the full-size model built with random weights on the GPU
    micro_s: float = 15.0  # the microbenchmarks, cuDNN's first plans included
    other_s_per_mp: float = 0.4  # text encoding, VAE encoding and decoding of one edit, per megapixel
    eager_overhead: float = 1.3  # eager seconds per call over the floor (norms, RoPE, activations, launches)
    compiled_overhead: float = 1.1  # the same with regional compile (fused elementwise work)
    baseline_overhead: float = 1.35  # diffusers' pipeline over the floor, per call
    compile_s: float = 60.0  # regional compile cold: two block graphs with dynamic shapes, warm-up, artifacts
    # Of the cold compile, what a later setting recompiles: fp8 in the single-stream blocks changes one of the
    # two block graphs, fp8 in all blocks then the other, an attention backend both.
    recompile_share: tuple[tuple[str, float], ...] = (("fp8", 0.5), ("attention", 1.0))
    quantise_s: float = 5.0  # torchao's fp8 quantisation of one scope, in place
    restart_s: float = 90.0  # the warm restart (measure.restart): imports, build, artifacts, warm-up, 1 edit
    serve_s: float = 45.0  # the real server on the tiny model (measure.serve_check)


ASSUMED = Assumptions()


@dataclass(frozen=True)
class Item:
    """One row of the plan."""

    name: str
    kind: str  # micro, warm, edit, baseline or setting
    level: AccelerationLevel | None = None
    large: bool = False  # at the large size
    repeats: int = 1
    probe: bool = False  # one more edit timed step by step: a skipped step against a computed one
    change: dict | None = None  # for a setting: the AccelerationConfig fields it adds
    measures: str | None = None  # for an edit: the setting it is there for (skipped when that one was not applied)


def plan(attention: str, repeats: int = 2) -> list[Item]:
    """The quick plan, in order of priority."""
    regional = "regional compile (cold setup, artifacts saved)"
    fp8, fp8_all, backend = "fp8 in the single-stream blocks", "fp8 in all blocks", f"attention {attention}"
    return [
        Item("microbenchmarks", "micro"),
        Item("first edit, untimed", "warm", NONE),
        Item("eager none", "edit", NONE, repeats=repeats),
        Item("eager go really fast", "edit", FASTEST, repeats=repeats),
        Item("diffusers eager", "baseline", NONE),
        Item(regional, "setting", change={"compile": CompileScope.REGIONAL}),
        Item("compiled none", "edit", NONE, repeats=repeats, measures=regional),
        Item("compiled go really fast", "edit", FASTEST, repeats=repeats, probe=True, measures=regional),
        Item(fp8, "setting", change={"fp8": Fp8Scope.SINGLE}),
        Item("fp8 single, go really fast", "edit", FASTEST, repeats=repeats, measures=fp8),
        Item(fp8_all, "setting", change={"fp8": Fp8Scope.ALL}),
        Item("fp8 all, go really fast", "edit", FASTEST, repeats=repeats, measures=fp8_all),
        Item("large size, go really fast", "edit", FASTEST, large=True),
        Item(backend, "setting", change={"attention": attention}),
        Item(f"{backend}, go really fast", "edit", FASTEST, repeats=repeats, measures=backend),
    ]


class Predictor:
    """Seconds a row will take: its transformer calls at the floor times the overhead measured so far (the
    assumed one until then), plus the edit's other phases; a setting's preparation from the compile measured."""

    def __init__(self, transformer_config: dict, steps: int, rates: floors.Rates, assumed: Assumptions = ASSUMED):
        self.config, self.steps, self.rates, self.a = transformer_config, steps, rates, assumed
        self.overhead = {"eager": assumed.eager_overhead, "compiled": assumed.compiled_overhead}
        self.baseline_overhead = assumed.baseline_overhead
        self.other_s_per_mp = assumed.other_s_per_mp
        self.compile_s = assumed.compile_s

    def floor(self, size: tuple[int, int], fp8: str | None = None) -> float:
        flops = floors.transformer_flops(self.config, floors.image_tokens(size))
        return floors.call_floor(flops, self.rates, fp8)

    def edit(self, size, level: AccelerationLevel, mode: str, fp8: str | None, steps: int | None = None) -> float:
        calls = sum(generate_compute_step_map(level, steps or self.steps))
        megapixels = size[0] * size[1] / 2**20
        return self.other_s_per_mp * megapixels + calls * self.floor(size, fp8) * self.overhead[mode]

    def item(self, item: Item, size, mode: str, config: AccelerationConfig) -> float:
        fp8 = config.fp8 and config.fp8.value
        if item.kind == "micro":
            return self.a.micro_s
        if item.kind == "warm":
            return self.edit(size, NONE, "eager", None, WARM_STEPS)
        if item.kind == "baseline":
            calls = self.steps
            return self.other_s_per_mp * size[0] * size[1] / 2**20 + calls * self.floor(size) * self.baseline_overhead
        if item.kind == "setting":
            if "compile" in item.change:
                return self.compile_s
            share = dict(self.a.recompile_share)
            return sum(self.a.quantise_s * (k == "fp8") + share[k] * self.compile_s for k in item.change)
        one = self.edit(size, item.level, mode, fp8)
        return one * (item.repeats + item.probe)

    def learn_edit(self, row: dict, mode: str, fp8: str | None) -> None:
        size = tuple(row["size"])
        s = row["seconds"]
        self.overhead[mode] = s["denoise"] / row["transformer_calls"] / self.floor(size, fp8)
        self.other_s_per_mp = (s["text"] + s["image"] + s["decode"]) / (size[0] * size[1] / 2**20)

    def learn_baseline(self, row: dict) -> None:
        self.baseline_overhead = row["seconds"]["total"] / row["transformer_calls"] / self.floor(tuple(row["size"]))


def predicted_plan(
    attention: str = "_native_cudnn", rates: floors.Rates = floors.ASSUMED_H100, assumed: Assumptions = ASSUMED
) -> list[tuple[str, float]]:
    """(what, seconds) of the whole `script/bench-gpu quick` on an H100 at `rates`, nothing measured: the model
    build, each row of this process, the warm restart and the server check."""
    predictor = Predictor(floors.full_config(), sampling.DEFAULT_STEPS, rates, assumed)
    config, mode = AccelerationConfig(), "eager"
    out = [("interpreter, imports, model build", assumed.build_s)]
    for item in plan(attention):
        if item.kind == "setting":
            config = dataclasses.replace(config, **item.change)
            mode = "compiled"
        size = GPU_LARGE_SIZE if item.large else GPU_SIZE
        out.append((item.name, predictor.item(item, size, mode, config)))
    return out + [("warm restart (measure.restart)", assumed.restart_s), ("server check", assumed.serve_s)]


class Quick:
    """One run of the plan on one model, writing each row as it is measured."""

    def __init__(self, args: argparse.Namespace, writer: RowWriter):
        self.args, self.writer = args, writer
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.budget = Budget(args.budget)
        self.config = AccelerationConfig()
        self.mode = "eager"
        self.baseline: dict | None = None
        self.applied: set[str] = set()  # the settings applied so far, by item name
        self.errors = 0

    def __call__(self) -> int:
        self.writer.write(
            "meta",
            **environment(self.device),
            config=self.args.config,
            command=" ".join(["python -m measure.quick", *self.args.argv]),
            plan={"items": [item.name for item in plan(self.args.attention)], "budget_s": self.args.budget},
            random_weights=True,
        )
        self._build()
        for item in plan(self.args.attention, self.args.repeats):
            self._item(item)
        self.writer.write("end", elapsed_s=self.budget.elapsed(), errors=self.errors)
        return self.errors

    def _build(self) -> None:
        t0 = clock.now(self.device)
        components = timing.build_components(self.args.config, self.device)
        build_s = clock.now(self.device) - t0
        self.transformer = components.transformer
        self.editor = KontextEditor(components)
        self.tconfig = dict(self.transformer.config)
        # Until the microbenchmarks have measured this machine: the assumed H100 rates, or a CPU's rough ones.
        rates = floors.ASSUMED_H100 if self.device.type == "cuda" else floors.Rates(gemm=1e11, sdpa=1e11)
        self.predictor = Predictor(self.tconfig, self.args.steps, rates)
        self.micro: list[dict] = []
        parameters = {
            name: sum(p.numel() for p in getattr(components, name).parameters())
            for name in ("transformer", "text_encoder_2", "text_encoder", "vae")
        }
        self.writer.write("build", build_s=build_s, dtype=str(components.dtype), parameters=parameters)
        timing.log(f"built the {self.args.config} model in {build_s:.1f} s")

    def _item(self, item: Item) -> None:
        size = self.args.large_size if item.large else self.args.size
        fields = {"item": item.name, "accelerations": self.config.describe()}
        mode, config = self.mode, self.config
        if item.kind == "setting":
            config = dataclasses.replace(self.config, **item.change)
            mode, fields["accelerations"] = "compiled" if config.compile else "eager", config.describe()
            try:
                config.validate(self.device)
            except ValueError as e:
                return self._skip(item, size, fields, f"not possible here: {e}", None)
        elif item.measures and item.measures not in self.applied:
            return self._skip(item, size, fields, f"its setting ({item.measures}) was not applied", None)
        predicted = self.predictor.item(item, size, mode, config)
        if self.budget.seconds is not None and self.budget.elapsed() + predicted > self.budget.seconds:
            left = self.budget.seconds - self.budget.elapsed()
            return self._skip(item, size, fields, f"time budget: {left:.0f} s left", predicted)
        timing.log(f"{item.name} (predicted {predicted:.1f} s)")
        run = {"micro": self._micro, "warm": self._warm, "edit": self._edit, "baseline": self._baseline}
        run["setting"] = self._setting
        t0 = clock.now(self.device)
        status = "done"
        try:
            run[item.kind](item, size, fields)
            if item.kind == "setting":
                self.applied.add(item.name)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self.writer.write("error", stage=item.name, error=f"{type(e).__name__}: {e}", **fields)
            self.errors += 1
            status = "error"
            timing.free_memory(self.device)
        taken = clock.now(self.device) - t0
        self.writer.write("item", item=item.name, status=status, predicted_s=predicted, taken_s=taken)

    def _skip(self, item: Item, size, fields: dict, reason: str, predicted: float | None) -> None:
        timing.log(f"{item.name}: skipped, {reason}")
        level = {"level": item.level.value} if item.level else {}
        self.writer.write(
            "skipped", **fields, **level, size=list(size), steps=self.args.steps, reason=reason, predicted_s=predicted
        )

    def _micro(self, item: Item, size, fields: dict) -> None:
        sequences = [floors.image_tokens(s) + sampling.TEXT_TOKENS for s in self.args.micro_sizes]
        heads, head_dim = self.tconfig["num_attention_heads"], self.tconfig["attention_head_dim"]
        fp8 = self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) >= (8, 9)
        self.micro = floors.measure_rates(self.device, self.transformer.dtype, sequences, heads, head_dim, fp8)
        for row in self.micro:
            self.writer.write("micro", item=item.name, **row)
        self.predictor.rates = floors.rates_from(self.micro, floors.image_tokens(size) + sampling.TEXT_TOKENS)
        timing.log("rates: " + ", ".join(bench_table.rates_summary(self.micro)))

    def _warm(self, item: Item, size, fields: dict) -> None:
        self.editor.edit_at_size(timing.request(item.level, size, WARM_STEPS), size, size)

    def _case(self, size) -> bench.Case:
        return bench.Case(size, self.args.steps, floors.transformer_flops(self.tconfig, floors.image_tokens(size)))

    def _floor(self, case: bench.Case, calls: int, fp8: str | None = None) -> dict:
        """The floor of `calls` calls of `case` at the rates measured in this run; at assumed ones, saying so,
        where the microbenchmarks failed."""
        if self.micro:
            rates = floors.rates_from(self.micro, floors.image_tokens(case.size) + sampling.TEXT_TOKENS)
        else:
            rates = self.predictor.rates
        rates = floors.for_setting(rates, fp8)
        return {"floor_s": calls * floors.call_floor(case.flops, rates, fp8), "floor_rates": rates.source}

    def _edit(self, item: Item, size, fields: dict) -> None:
        case, fp8 = self._case(size), self.config.fp8 and self.config.fp8.value
        r = timing.bench_ours(self.editor, item.level, size, self.args.steps, item.repeats, item.probe, untimed=False)
        r.update(self._floor(case, r["transformer_calls"], fp8))
        r["ratio_to_floor"] = r["seconds"]["total"] / r["floor_s"]
        r["denoise_ratio_to_floor"] = r["seconds"]["denoise"] / r["floor_s"]
        if self.baseline is not None and self.baseline["size"] == list(size):
            r["speedup_vs_baseline"] = self.baseline["seconds"]["total"] / r["seconds"]["total"]
        row = self.writer.write("run", **case.fields(), **fields, **r)
        self.predictor.learn_edit(row, self.mode, fp8)

    def _baseline(self, item: Item, size, fields: dict) -> None:
        case = self._case(size)
        components = dataclasses.replace(self.editor.components, transformer=self.transformer)
        base = timing.bench_baseline(components, size, self.args.steps, item.repeats, untimed=False)
        base.update(self._floor(case, base["transformer_calls"]))
        base["ratio_to_floor"] = base["seconds"]["total"] / base["floor_s"]
        fields = fields | {"accelerations": "diffusers eager"}
        self.baseline = self.writer.write("baseline", **case.fields(), **fields, level="none", **base)
        self.predictor.learn_baseline(self.baseline)

    def _setting(self, item: Item, size, fields: dict) -> None:
        """Apply `item.change` to the transformer in place and warm up what it needs."""
        target = dataclasses.replace(self.config, **item.change)
        timing.mark_memory(self.device)  # this setting's peaks: quantisation, compilation and warm-up included
        graphs = timing.graphs_compiled()
        shapes = [Shape(*size, *size)]
        if self.config == AccelerationConfig():  # nothing applied yet: the server's own setup path
            prepare = optimize.optimize(
                self.transformer, target, self.args.compile_cache, shapes, compile_backend=self.args.compile_backend
            )
        else:
            prepare = apply_in_place(self.transformer, self.config, target)
            prepare["warm_up"] = optimize.warm_up(self.transformer, optimize.warm_up_shapes(target, shapes))
        self.config, self.mode = target, "compiled" if target.compile else "eager"
        extra = {}
        if "compile" in item.change and self.args.compile_cache:
            path = optimize.artifact_path(self.args.compile_cache, self.transformer, target, self.args.compile_backend)
            extra["artifacts"] = {"path": str(path), "bytes": path.stat().st_size if path.is_file() else None}
            self.predictor.compile_s = sum(prepare.values())
        compiles = timing.graphs_compiled() - graphs
        self.writer.write(
            "setting", **fields, prepare_s=prepare, compiles=compiles, **timing.peak_memory(self.device), **extra
        )
        timing.log(f"{item.name}: {sum(prepare.values()):.1f} s ({compiles} graphs compiled)")


def apply_in_place(
    transformer: torch.nn.Module, current: AccelerationConfig, target: AccelerationConfig
) -> dict[str, float]:
    """Take `transformer`, which has `current` applied, to `target` in place: what can be added to a model
    that is compiled already (fp8 of a wider scope, an attention backend). Compiled code meets the changed
    weights or backend at its next call and recompiles then (the warm-up). Returns seconds per step."""
    added = {k: v for k, v in dataclasses.asdict(target).items() if dataclasses.asdict(current)[k] != v}
    unsupported = set(added) - {"fp8", "attention"}
    if unsupported or (current.fp8 is Fp8Scope.ALL and target.fp8 is not Fp8Scope.ALL):
        raise ValueError(f"cannot go from {current.describe()} to {target.describe()} in place")
    device, seconds = transformer.device, {}
    if "attention" in added:
        t0 = clock.now(device)
        transformer.set_attention_backend(target.attention)
        seconds["attention"] = clock.now(device) - t0
    if "fp8" in added:
        t0 = clock.now(device)
        optimize.quantize_fp8(transformer, target.fp8)  # layers quantised already are left as they are
        seconds["quantise"] = clock.now(device) - t0
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print the predicted time on an H100 and exit")
    parser.add_argument("--config", choices=["tiny", "full"], default="full")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=sampling.DEFAULT_STEPS)
    parser.add_argument("--size", type=timing.parse_size, default=GPU_SIZE, help="WIDTHxHEIGHT of most rows")
    parser.add_argument("--large-size", type=timing.parse_size, default=GPU_LARGE_SIZE, help="of the large row")
    parser.add_argument(
        "--micro-sizes",
        type=lambda text: [timing.parse_size(t) for t in text.split(",")],
        default=[(512, 512), GPU_SIZE, GPU_LARGE_SIZE],
        help="sizes whose token counts the SDPA microbenchmarks run at (default: 0.25, 1 and 2 MP)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed edits per row (the median is reported)")
    parser.add_argument("--attention", default="_native_cudnn", help="the attention backend of the last setting")
    parser.add_argument("--compile-backend", default="inductor", help="'eager' on the CPU (no code generation)")
    parser.add_argument("--compile-cache", type=Path, help="where the compile artifacts are saved (for a restart)")
    parser.add_argument("--budget", type=float, help="seconds within which every row started must end")
    records.add_row_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, writer = records.start(build_parser(), argv)
    if args.plan:
        rows = predicted_plan(args.attention)
        for what, seconds in rows:
            print(f"{seconds:7.1f} s  {what}")
        print(f"{sum(s for _, s in rows):7.1f} s  in all (assumed rates: {floors.ASSUMED_H100.source})")
        return 0
    with writer:
        errors = Quick(args, writer)()
    print(bench_table.render(writer.rows))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
