"""Weight-loading throughput against the disk's own read rate, side by side in one run.

    python -m measure.load [--gb 3] [--dir DIR] [--repeats 2] [--jsonl out/load.jsonl]

Builds (once, into DIR) a synthetic FLUX transformer with FLUX.1's widths and fewer blocks, about --gb GB in
bfloat16, saved by diffusers in the layout of the real model (transformer/config.json and sharded safetensors
with their index). Then, alternating, each in a fresh process and with the files evicted from the page cache
first (posix_fadvise DONTNEED), so that every figure is a read from the disk:

- `disk`: every file read sequentially in 16 MiB pieces into one buffer, nothing else: the disk's own rate;
- `load`: flux.model.load_strict as setup calls it (`device_map`: each tensor read from the file straight onto
  the device), then one element of every 4 KiB page of every parameter touched, because on the CPU the load
  maps the files and reads them only when touched;
- `load+to`: the path setup took before (load into host memory, then `.to(device)`), touched the same way.

The summary is the median of the rounds. Each row has the seconds, GB/s, the ratio to the disk's rate, and
the process's peak resident memory with its anonymous and file-backed parts after the load. On the CPU the
device is host memory, so `load` and `load+to` do the same work; what the rows show is how close the loader
comes to the disk, and that it keeps no copy of the weights of its own (they stay file-backed pages). On a GPU
the difference is where the bytes go: `load` copies tensor by tensor to the GPU, `load+to` first builds the
whole model in host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from measure.records import RowWriter

READ_CHUNK = 16 << 20
PAGE = 4096


def component_files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "transformer").iterdir() if p.is_file())


def build(directory: Path, gigabytes: float) -> Path:
    """The synthetic transformer in `directory` (kept if already there): FLUX.1's widths, as many double-stream
    blocks (with twice as many single-stream ones) as fit in `gigabytes` in bfloat16, random weights."""
    import torch

    from flux.tiny import FULL, synthetic_transformer

    marker = directory / "transformer" / "config.json"
    if marker.exists():
        return directory

    def with_pairs(n: int):  # n double-stream blocks and 2n single-stream ones, FLUX.1's widths, on "meta"
        with torch.device("meta"):
            return synthetic_transformer(replace(FULL, num_layers=n, num_single_layers=2 * n))

    def size(model) -> int:
        return sum(p.numel() for p in model.parameters()) * 2  # bfloat16

    per_pair = size(with_pairs(2)) - size(with_pairs(1))
    model = with_pairs(max(1, round((gigabytes * 1e9 - size(with_pairs(1)) + per_pair) / per_pair)))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
    staging = directory.with_name(directory.name + ".partial")
    model.save_pretrained(staging / "transformer", max_shard_size="1GB")
    staging.rename(directory)
    return directory


def _evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (all caches too, where this process may: root on Linux)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _memory() -> dict[str, float]:
    """Peak resident memory and the anonymous / file-backed parts now, in GB (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024 / 1e9
    return {"peak_rss_gb": fields["VmHWM"], "anon_gb": fields["RssAnon"], "file_gb": fields["RssFile"]}


def _touch(model) -> int:
    """Read one element of every page of every parameter; returns the bytes covered."""
    import torch

    covered = 0
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            flat[:: max(1, PAGE // p.element_size())].float().sum().item()
            covered += flat.numel() * p.element_size()
    return covered


def child(mode: str, directory: Path, device: str) -> dict:
    """One measurement in this (fresh) process."""
    files = component_files(directory)
    size = sum(p.stat().st_size for p in files)
    if mode != "disk":  # the libraries' import time is not loading
        import torch
        from diffusers import FluxTransformer2DModel

        from flux.model import load_strict
    _evict(files)
    t0 = time.perf_counter()
    if mode == "disk":
        buffer = bytearray(READ_CHUNK)  # one buffer, reused: the copy out of the page cache, no allocation
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        extra = {}
    else:
        if mode == "load":
            model = load_strict(
                FluxTransformer2DModel, directory, "transformer", torch_dtype=torch.bfloat16, device_map=device
            )
        else:
            model = load_strict(FluxTransformer2DModel, directory, "transformer", torch_dtype=torch.bfloat16)
            model = model.to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        loaded = time.perf_counter() - t0
        covered = _touch(model)
        extra = {"parameter_gb": covered / 1e9, "load_seconds": loaded}
    seconds = time.perf_counter() - t0
    return {"mode": mode, "device": device, "bytes": size, "seconds": seconds, **extra, **_memory()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="size of the synthetic component (default 3 GB)")
    parser.add_argument("--dir", type=Path, default=Path("out") / "load-bench-model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of disk, load, load+to (default 2)")
    parser.add_argument("--jsonl", type=Path, default=None, help="append the rows here as JSON lines")
    parser.add_argument("--child", choices=("disk", "load", "load+to"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.device)))
        return 0
    t0 = time.perf_counter()
    build(args.dir, args.gb)
    print(f"synthetic transformer in {args.dir} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    results: dict[str, list[dict]] = {"disk": [], "load": [], "load+to": []}
    with RowWriter(args.jsonl, run=f"load-{int(time.time())}") as rows:
        modes = list(results)
        for round_ in range(args.repeats):
            # Each round in another order: what runs first after a round (the page cache just dropped, the
            # memory just freed) must not always be the same mode.
            for mode in modes[round_ % 3 :] + modes[: round_ % 3]:
                command = [sys.executable, "-m", "measure.load", "--child", mode, "--dir", str(args.dir)]
                out = subprocess.run(command + ["--device", args.device], check=True, capture_output=True, text=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results[mode].append(row)
                rows.write("load", **row)
    disk = statistics.median(r["seconds"] for r in results["disk"])
    size = results["disk"][0]["bytes"]
    print(f"{size / 1e9:.2f} GB in {len(component_files(args.dir))} files, {args.repeats} rounds, cold page cache:")
    print("| mode | median s (from_pretrained) | fastest s | GB/s (median) | × disk (median) | peak RSS GB | anon GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, found in results.items():
        seconds = statistics.median(r["seconds"] for r in found)
        part = f" ({statistics.median(r['load_seconds'] for r in found):.2f})" if "load_seconds" in found[0] else ""
        last = found[-1]
        print(
            f"| {mode} | {seconds:.2f}{part} | {min(r['seconds'] for r in found):.2f} | {size / 1e9 / seconds:.2f} "
            f"| {seconds / disk:.2f} | {last['peak_rss_gb']:.2f} | {last['anon_gb']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
