"""The GPU measurement kit: the speed figures docs/benchmarks.md lacks, in parts that each fit one command on a
GPU available for minutes (script/bench-gpu is the entry point).

    python -m measure.kit quick              # the headline figures in one command (at most 9 minutes)
    python -m measure.kit --smoke quick      # the same on the tiny model on the CPU (the tests run it)
    python -m measure.kit 1                  # a part, or several in order: python -m measure.kit 2 4
    python -m measure.kit --smoke            # parts 1-5 on the tiny model on the CPU (the tests run it)

`quick` is three processes: measure.quick (the model built once; microbenchmarks, eager against diffusers,
regional compile, fp8, 2 MP and cuDNN attention applied in place, in that order of priority, each row predicted
before it starts), measure.restart (a warm restart from the artifacts quick saved) and measure.serve_check (the
real server on the tiny model on the GPU, over HTTP). The longer parts below are for longer windows:

Parts, on the full-size model with random weights built on one CUDA GPU, 1024² output and context, 28 steps:

    1  diffusers' eager FluxKontextPipeline (bf16) against ours, eager, at none / go fast / go really fast
    2  regional compile (the server's GPU default) at the three levels, warming up what it needs of the served
       shapes and saving the compile artifacts, as the server's setup() does
    3  fp8 linear layers + regional compile, single-stream blocks and all blocks, at none and go really fast
    4  warm restart: setup() in a fresh process with part 2's artifacts (a cold process first if there are none)
    5  resolution scaling, 0.25 / 1 / 2 MP, for the server's default setting
    6  (optional) QKV fusion, and the cuDNN attention backend, with regional compile

Each part runs in fresh processes with empty compiler caches (as a new container starts), streams its output
to OUT/bench-gpu.log and writes its rows to OUT/partN.jsonl as they are measured. A command has a deadline
(--deadline-s, default 540 s for a 600 s command); each part gets a hard time limit within it, leaving what the
later parts of the same command need, and a budget after which it starts no new row. A part killed at its
limit keeps every row it finished. The tables for the parts run are printed at the end (measure.bench_table).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from measure import bench_table, records
from measure.records import ENV_DEADLINE_AT, PACKAGES, RowWriter, nvidia_smi, package_version, read_rows

ROOT = Path(__file__).resolve().parent.parent
LOG_NAME = "bench-gpu.log"
CACHE = "{cache}"  # placeholder in the arguments for the compile-artifact directory shared by parts 2 and 4

ALL_LEVELS = "none,go fast,go really fast"
NONE_AND_FASTEST = "none,go really fast"
SERVER_DEFAULT_GPU = bench_table.SERVER_DEFAULT_GPU  # regional; a test checks it against flux.optimize

_FULL = ("--config", "full", "--steps", "28")
_TINY = ("--config", "tiny", "--steps", "10", "--repeats", "1")
_EAGER_BACKEND = ("--compile-backend", "eager")  # on the CPU: dynamo's tracing and guards, no code generation


@dataclass(frozen=True)
class Part:
    """One part of the plan: the tool it runs, its arguments on the GPU and in the CPU smoke run, and time."""

    name: str
    title: str
    module: str  # measure.bench or measure.restart
    gpu_args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    estimate_s: int  # expected seconds on one H100 (model build, compile and warm-up included)
    reserve_s: int  # the least it needs to give its main figure: kept free for it when an earlier part runs
    tail_s: int  # the longest single step it may start (a compile, one row): budget = limit - tail
    limit_s: int = 480  # hard limit of the part on its own
    fresh_compile_cache: bool = False  # start with no saved artifacts (part 2 times a cold compile)
    needs_artifacts: bool = False  # a restart that only runs on artifacts an earlier part saved (no cold one)

    @property
    def file(self) -> str:
        """Its rows' file in OUT: partN.jsonl for the numbered parts, NAME.jsonl for the others."""
        return f"part{self.name}.jsonl" if self.name.isdigit() else f"{self.name}.jsonl"


def _gpu(*args: str, repeats: int = 2) -> tuple[str, ...]:
    """measure.bench arguments on the full-size model."""
    return (*_FULL, *args, "--repeats", str(repeats))


def _smoke(*args: str) -> tuple[str, ...]:
    """measure.bench arguments on the tiny model, compiling with the eager backend."""
    return (*_TINY, *_EAGER_BACKEND, *args)


def _settings(accelerations: str, levels: str = NONE_AND_FASTEST) -> tuple[str, ...]:
    """Our settings only (no diffusers baseline, no skipped-step probe): the rows of parts 3, 5 and 6."""
    return ("--accelerations", accelerations, "--levels", levels, "--no-baseline", "--no-step-probe")


def _restart(config: str, shapes: str, edit_size: str, steps: int, *extra: str) -> tuple[str, ...]:
    """measure.restart arguments: the server's setup() with the artifacts of part 2, then a first edit."""
    return (
        *("--config", config, *extra, "--accelerations", SERVER_DEFAULT_GPU, "--compile-cache", CACHE),
        *("--shapes", shapes, "--edit-size", edit_size, "--steps", str(steps)),
    )


_FP8 = f"fp8+{SERVER_DEFAULT_GPU},fp8-all+{SERVER_DEFAULT_GPU}"

PARTS: dict[str, Part] = {
    p.name: p
    for p in [
        Part(
            "1",
            "diffusers eager vs ours eager, three levels",
            "measure.bench",
            _gpu("--size", "1024x1024", "--accelerations", "off", "--levels", ALL_LEVELS, repeats=3),
            (*_TINY, "--size", "64x48", "--accelerations", "off", "--levels", ALL_LEVELS),
            estimate_s=240,
            reserve_s=180,
            tail_s=60,
        ),
        Part(
            "2",
            f"{SERVER_DEFAULT_GPU} compile, three levels, artifacts saved",
            "measure.bench",
            _gpu(
                *("--size", "1024x1024", "--accelerations", SERVER_DEFAULT_GPU, "--levels", ALL_LEVELS),
                *("--no-baseline", "--warm-up", "served", "--compile-cache", CACHE),
                repeats=3,
            ),
            _smoke(
                *("--size", "64x48", "--accelerations", SERVER_DEFAULT_GPU, "--levels", ALL_LEVELS),
                *("--no-baseline", "--compile-cache", CACHE),
            ),
            estimate_s=270,
            reserve_s=240,
            tail_s=60,
            fresh_compile_cache=True,
        ),
        Part(
            "3",
            "fp8 (single-stream / all blocks) + regional compile, none and go really fast, peak memory",
            "measure.bench",
            _gpu("--size", "1024x1024", *_settings(_FP8)),
            _smoke("--size", "64x48", *_settings(_FP8)),
            estimate_s=360,
            reserve_s=300,
            tail_s=180,
        ),
        Part(
            "4",
            "warm restart: setup() with saved compile artifacts in a fresh process",
            "measure.restart",
            _restart("full", "served", "1024x1024", 28),
            _restart("tiny", "64x48", "64x48", 10, *_EAGER_BACKEND),
            estimate_s=90,  # with part 2's artifacts; about 270 when a cold process must save them first
            reserve_s=150,
            tail_s=0,
            limit_s=420,
        ),
        Part(
            "5",
            f"resolution scaling, 0.25 / 1 / 2 MP, {SERVER_DEFAULT_GPU}",
            "measure.bench",
            _gpu("--megapixels", "0.25,1,2", *_settings(SERVER_DEFAULT_GPU)),
            _smoke("--size", "64x64", "--size", "128x128", "--size", "176x176", *_settings(SERVER_DEFAULT_GPU)),
            estimate_s=300,
            reserve_s=240,
            tail_s=90,
        ),
        Part(
            "6",
            "optional: QKV fusion, cuDNN attention, with regional compile",
            "measure.bench",
            _gpu(
                "--size",
                "1024x1024",
                *_settings(f"fuse+{SERVER_DEFAULT_GPU},{SERVER_DEFAULT_GPU}+attention=_native_cudnn"),
            ),
            # the CPU has no cuDNN: torch's own SDPA backend stands in for it
            _smoke("--size", "64x48", *_settings(f"fuse+{SERVER_DEFAULT_GPU},{SERVER_DEFAULT_GPU}+attention=native")),
            estimate_s=360,
            reserve_s=300,
            tail_s=180,
        ),
    ]
}
_QUICK_SMOKE = (
    *("--config", "tiny", "--compile-backend", "eager", "--steps", "10", "--size", "64x48", "--large-size", "96x96"),
    *("--micro-sizes", "64x48,96x96", "--attention", "_native_math"),  # the CPU has no cuDNN
)
QUICK = ("quick", "quick-restart", "quick-serve")
"""`script/bench-gpu quick`: the headline figures within one command (measure.quick), then a warm restart from
the artifacts it saved, then the real server on the device."""

PARTS.update(
    {
        p.name: p
        for p in [
            Part(
                "quick",
                "microbenchmarks, eager vs diffusers, regional compile, fp8, 2 MP, cuDNN attention, in place",
                "measure.quick",
                ("--config", "full", "--compile-cache", CACHE),
                (*_QUICK_SMOKE, "--compile-cache", CACHE),
                estimate_s=348,  # measure.quick --plan: its rows and the model build at the assumed H100 rates
                reserve_s=240,
                tail_s=15,  # every row it starts must end within its budget: the margin is for its tables
                limit_s=420,
                fresh_compile_cache=True,
            ),
            Part(
                "quick-restart",
                "warm restart: setup() in a fresh process with quick's compile artifacts",
                "measure.restart",
                _restart("full", "served", "1024x1024", 28),
                _restart("tiny", "64x48", "64x48", 10, *_EAGER_BACKEND),
                estimate_s=90,
                reserve_s=100,
                tail_s=0,
                limit_s=150,
                needs_artifacts=True,
            ),
            Part(
                "quick-serve",
                "the real server (script/serve) on the tiny model, one prediction per level over HTTP",
                "measure.serve_check",
                ("--device", "cuda"),
                ("--device", "cpu", "--steps", "8"),
                estimate_s=45,
                reserve_s=60,
                tail_s=0,
                limit_s=120,
            ),
        ]
    }
)
PARTS["parallel"] = Part(
    "parallel",
    "several GPUs: one transformer call at degrees 1, 2, 4 and 8 (as many as there are GPUs), eager then regional",
    "measure.parallel",
    ("--config", "full", "--degrees", "1,2,4,8", "--accelerations", f"off,{SERVER_DEFAULT_GPU}"),
    (
        *("--config", "tiny", "--heads", "2", "--degrees", "1,2", "--size", "64x48", "--size", "64x48:48x48"),
        *("--accelerations", SERVER_DEFAULT_GPU, "--compile-backend", "eager", "--calls", "2"),
    ),
    estimate_s=420,  # 8 GPUs: ~30 s a degree eager (processes, the model built on each GPU, calls), ~90 s compiled
    reserve_s=150,
    tail_s=120,  # one degree's processes, compile included
)
"""On a machine with several GPUs (`script/bench-gpu parallel`); none of the machines lent here has more than one."""
SMOKE_PARTS = ("1", "2", "3", "4", "5")
"""The plan the smoke run covers; part 6 is optional on the GPU (`script/bench-gpu smoke 6` runs its CPU stand-in)."""


class Kit:
    """Runs parts in order within one command's deadline, each in fresh processes, logging everything."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.cache = self.work / "compile-cache"
        self.start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = (self.out / LOG_NAME).open("a", encoding="utf-8")
        self.failures = 0

    def say(self, message: str) -> None:
        line = f"[kit {time.perf_counter() - self.start:6.1f} s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def remaining(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.start)

    def run(self, names: list[str]) -> int:
        for i, name in enumerate(names):
            part = PARTS[name]
            jsonl = self.out / part.file
            if self.args.smoke:  # the GPU's time limits mean nothing on the CPU: only the deadline counts
                later, limit, least = 0, self.remaining(), 1
            else:
                later = sum(PARTS[n].reserve_s for n in names[i + 1 :])
                limit, least = min(part.limit_s, self.remaining() - later), part.reserve_s / 2
            if limit < least:
                self.say(f"part {name}: not started, {self.remaining():.0f} s left in this command ({later} s kept)")
                with RowWriter(jsonl, part=name) as w:
                    w.write("part", process="not started", returncode=None, seconds=0, limit_s=limit, budget_s=None)
                self.failures += 1
                continue
            self.say(f"part {name}: {part.title} (about {part.estimate_s} s on one H100; limit {limit:.0f} s)")
            if part.fresh_compile_cache:
                shutil.rmtree(self.cache, ignore_errors=True)
            if part.module == "measure.restart":
                self._restart_part(part, jsonl, limit)
            elif part.module == "measure.serve_check":
                self._process(part, "serve", self._args(part), jsonl, limit, None)
            else:
                budget = max(limit - part.tail_s, limit / 2)
                self._process(part, "bench", [*self._args(part), "--budget", f"{budget:.0f}"], jsonl, limit, budget)
        files = [self.out / PARTS[n].file for n in names if (self.out / PARTS[n].file).exists()]
        if files:
            table = bench_table.render(read_rows(*files))
            print(table, flush=True)
            self.log_file.write(table + "\n")
        self.say(f"done: {len(names)} part(s), {self.failures} with a failure; rows in {self.out}/*.jsonl")
        self.log_file.close()
        return 1 if self.failures else 0

    def _args(self, part: Part) -> list[str]:
        args = part.smoke_args if self.args.smoke else part.gpu_args
        return [str(self.cache) if a == CACHE else a for a in args] + ["--part", part.name]

    def _restart_part(self, part: Part, jsonl: Path, limit: float) -> None:
        """The restart in a fresh process. Without saved artifacts: part 4 runs a cold process first (it compiles
        and saves them); a part that `needs_artifacts` (the quick plan's, which come from measure.quick) does
        not start on a GPU, and on the CPU runs anyway (dynamo's eager backend saves none to find)."""
        deadline = time.perf_counter() + limit
        if not any(self.cache.glob("transformer-*.bin")) and part.needs_artifacts and not self.args.smoke:
            self.say(f"part {part.name}: not started, no compile artifacts were saved before it")
            with RowWriter(jsonl, part=part.name) as w:
                w.write("part", process="not started: no compile artifacts", returncode=None, seconds=0, limit_s=limit)
            self.failures += 1
            return
        if not any(self.cache.glob("transformer-*.bin")) and not part.needs_artifacts:
            self.say("no compile artifacts saved yet: a cold process compiles and saves them first")
            cold_limit = limit - min(part.reserve_s, limit / 2)
            self._process(part, "restart (cold)", self._args(part), jsonl, cold_limit, None)
        self._process(part, "restart", self._args(part), jsonl, deadline - time.perf_counter(), None)

    def _process(self, part: Part, label: str, args: list[str], jsonl: Path, limit: float, budget) -> None:
        """Run one tool in a fresh process with empty compiler caches; stream its output; stop it at `limit`."""
        tag = f"part{part.name}-{label.replace(' ', '-').replace('(', '').replace(')', '')}"
        caches = {
            "TORCHINDUCTOR_CACHE_DIR": self.work / f"inductor-{tag}",
            "TRITON_CACHE_DIR": self.work / f"triton-{tag}",
        }
        for path in caches.values():
            shutil.rmtree(path, ignore_errors=True)
        argv = [sys.executable, "-m", part.module, *args, "--jsonl", str(jsonl)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{k: str(v) for k, v in caches.items()})
        env["BENCH_LAUNCHED_AT"] = repr(time.time())
        # The process ends itself a little after the kit would have stopped it, should the kit be stopped first.
        env[ENV_DEADLINE_AT] = repr(time.time() + max(limit, 1) + 20)
        self.say(f"part {part.name}: {' '.join(argv[1:])}")
        t0 = time.perf_counter()
        # Its own process group, so that stopping it stops the compiler's workers too; the same session, so that
        # whatever stops this command stops it as well (a new session could outlive the command on a lent GPU).
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0
        )
        reader = threading.Thread(target=self._copy, args=(proc.stdout,), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(
                f"part {part.name}: {label} reached its limit of {limit:.0f} s; stopping it (rows so far are kept)"
            )
            records.stop_group(proc)
        reader.join(timeout=30)
        seconds = time.perf_counter() - t0
        for path in caches.values():
            shutil.rmtree(path, ignore_errors=True)
        if proc.returncode != 0 or timed_out:
            self.failures += 1
        self.say(
            f"part {part.name}: {label} {'timed out' if timed_out else f'exit {proc.returncode}'} in {seconds:.0f} s"
        )
        with RowWriter(jsonl, part=part.name) as w:
            w.write(
                "part",
                process=label,
                returncode=proc.returncode,
                timed_out=timed_out,
                seconds=seconds,
                limit_s=limit,
                budget_s=budget,
                kit_command=" ".join(["python -m measure.kit", *self.args.argv]),
            )

    def _copy(self, stream: IO[str]) -> None:
        for line in stream:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.log_file.write(line)
            self.log_file.flush()


def preflight(args: argparse.Namespace, names: list[str]) -> str | None:
    """What stops the parts before they start (a missing GPU or library), as a message; None when all is there.
    Cheap on purpose: on a lent GPU, a broken environment should cost seconds, not a model build."""
    lines = [f"python {sys.version.split()[0]} ({sys.executable})"]
    lines += [f"{name} {package_version(name) or 'MISSING'}" for name in ("torch", *PACKAGES)]
    smi = nvidia_smi()
    if smi:
        lines.append(f"{smi['gpu']}, driver {smi['driver']}, {smi['gpu_memory']}")
    print("environment: " + "; ".join(lines), flush=True)
    wanted = ["diffusers"]
    if "quick-serve" in names:
        wanted += ["cog", "coglet", "structlog"]
    if not args.smoke and {"3", "quick"} & set(names):
        wanted.append("torchao")
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        return (
            f"{', '.join(missing)} not importable by {sys.executable}. On a machine with network run "
            "script/fetch-wheels, bring .whl/ along with the working tree, and start the kit with script/bench-gpu, "
            "which installs the wheels it finds there."
        )
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            return "parts 1-6 need a CUDA GPU (the full-size model is ~34 GB in bf16); on the CPU run the smoke plan"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help=f"parts to run, in order: {', '.join(PARTS)} (smoke: all)")
    parser.add_argument(
        "--smoke", action="store_true", help="the tiny model on the CPU instead of the full one on a GPU"
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or "out", help="where rows and the log go ($OUT)")
    parser.add_argument(
        "--work",
        default=os.environ.get("BENCH_WORK", "/tmp/flux-bench"),
        help="compile artifacts and compiler caches (large; not under --out)",
    )
    parser.add_argument("--deadline-s", type=float, help="seconds for the whole command (GPU 540, smoke 1200)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    names = args.parts or (list(SMOKE_PARTS) if args.smoke else [])
    if "quick" in names:  # the quick plan is its three parts, in their order
        names = [n for n in names if n not in QUICK]
        names = [*QUICK, *names]
    if not names:
        parser.error(f"name the parts to run ({', '.join(PARTS)}), or --smoke")
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if args.deadline_s is None:
        args.deadline_s = 1200.0 if args.smoke else 540.0
    problem = preflight(args, names)
    if problem:
        print(f"bench-gpu: {problem}", file=sys.stderr)
        return 2
    return Kit(args).run(names)


if __name__ == "__main__":
    raise SystemExit(main())
