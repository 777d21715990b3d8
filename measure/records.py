"""What the measuring tools write and how long they may take.

Rows are JSON objects, one per line, written and flushed the moment they are measured: a run stopped at a
time limit (a lent GPU gives each command minutes, not hours) still leaves every row it finished. Every
run starts with a `meta` row that says what it ran on (GPU, driver, torch/CUDA, library versions), which is
what a figure needs before it can be quoted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

PACKAGES = ("diffusers", "transformers", "torchao", "accelerate", "huggingface_hub", "safetensors", "tokenizers")
"""Library versions recorded with every run (read from package metadata: importing torchao costs seconds)."""


class RowWriter:
    """Rows in memory, and as JSON lines in `path` (appended, flushed per row) when a path is given.

    `common` fields (the run id, the kit's part) go into every row, so rows from several runs can share a
    file and still be told apart.
    """

    def __init__(self, path: str | Path | None = None, **common):
        self.rows: list[dict] = []
        self.common = common
        self._file: IO[str] | None = None
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, kind: str, **fields) -> dict:
        row = {"kind": kind, **self.common, **fields}
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row, default=str) + "\n")
            self._file.flush()
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def add_row_options(parser: argparse.ArgumentParser) -> None:
    """The options every tool of the kit takes: where its rows go, and the part they belong to."""
    parser.add_argument("--jsonl", type=Path, help="append each row here as a JSON line, as soon as it is measured")
    parser.add_argument("--part", help="a label for every row (the GPU kit's part)")


def start(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, RowWriter]:
    """Parse a kit tool's command line (keeping it as `args.argv`, for the record), arm the command's deadline
    and open its row writer."""
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    exit_at_deadline()
    common = {"run_id": run_id()} | ({"part": args.part} if args.part else {})
    return args, RowWriter(args.jsonl, **common)


def read_rows(*paths: str | Path) -> list[dict]:
    """The rows of JSON-lines files, in order. A last line cut off mid-write (a killed run) is skipped."""
    rows = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"skipping an incomplete line in {path}", file=sys.stderr)
    return rows


ENV_DEADLINE_AT = "BENCH_DEADLINE_AT"
"""Epoch seconds at which a measuring process ends itself (set by measure.kit)."""


def exit_at_deadline() -> None:
    """End this process at $BENCH_DEADLINE_AT, whatever it is doing, when that is set. The kit that started it
    stops it earlier; this is for when the kit itself was stopped: a process left running on a lent GPU would
    hold its memory and its compute through the next command. Rows written so far are already on disk."""
    value = os.environ.get(ENV_DEADLINE_AT)
    if not value:
        return

    def stop() -> None:
        print(f"{ENV_DEADLINE_AT} reached: exiting; the rows written so far are kept", file=sys.stderr, flush=True)
        os._exit(124)

    timer = threading.Timer(max(float(value) - time.time(), 0.0), stop)
    timer.daemon = True
    timer.start()


class Budget:
    """Seconds a run may spend before it starts nothing new (None: no limit). What has started finishes:
    the caller sizes the budget so that its longest step still fits in the time it really has."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def reason(self) -> str:
        return f"time budget: {self.elapsed():.0f} s used of {self.seconds:.0f} s"


def run_id() -> str:
    return f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict:
    """GPU name, driver and memory as nvidia-smi reports them ({} where it is missing or fails)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    name, driver, memory = (field.strip() for field in out.stdout.splitlines()[0].split(","))
    return {"gpu": name, "driver": driver, "gpu_memory": memory}


def environment(device) -> dict:
    """What a figure needs beside it: date, machine, GPU and driver, torch/CUDA, the libraries' versions.
    `device` is a torch.device (torch is imported here, so that reading rows does not need it)."""
    import torch

    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "versions": {name: package_version(name) for name in PACKAGES},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_bytes=props.total_memory,
            cudnn=torch.backends.cudnn.version(),
            **nvidia_smi(),
        )
    else:
        env["device"] = platform.processor() or platform.machine() or "cpu"
    return env


def stop_group(proc: subprocess.Popen, wait: float = 15) -> None:
    """Stop a process started in its own process group, with everything it started (a compiler's workers, a
    server's worker): SIGTERM to the group, SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
