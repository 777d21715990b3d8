"""The GPU measurement kit: its plan on the CPU (script/bench-gpu smoke), the GPU plan's arguments, time limits
that stop a part and keep its rows, and the message when the carried wheels are missing."""

import argparse
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flux.optimize import AccelerationConfig
from flux.taylor_seer_utils import generate_compute_step_map
from flux.tiny import build_pipeline
from measure import bench, bench_table, kit, parallel, quick, restart, serve_check
from measure.records import read_rows

ROOT = Path(__file__).resolve().parent.parent
FILES_BACK = 8  # a device command returns at most 8 files from $OUT, named in letters, digits, '.', '_', '-'


def test_smoke_plan_runs_every_part_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), BENCH_WORK=str(work), PYTHON=sys.executable)
    proc = subprocess.run(
        [str(ROOT / "script" / "bench-gpu"), "smoke"], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-gpu.log", *(f"part{n}.jsonl" for n in kit.SMOKE_PARTS)]
    assert len(files) <= FILES_BACK and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    parts = {n: read_rows(out / f"part{n}.jsonl") for n in kit.SMOKE_PARTS}
    for n, rows in parts.items():
        done = [r for r in rows if r["kind"] == "part"]
        assert done and all(r["returncode"] == 0 and not r["timed_out"] for r in done), n
        assert not [r for r in rows if r["kind"] == "error"], n
        assert all(r["part"] == n for r in rows)

    def runs(n):
        return [r for r in parts[n] if r["kind"] == "run"]

    (base,) = [r for r in parts["1"] if r["kind"] == "baseline"]
    assert base["transformer_calls"] == 10 and base["floor_s"] > 0
    assert [r["level"] for r in runs("1")] == ["none", "go fast", "go really fast"]
    for r in runs("1") + runs("2") + runs("5"):
        assert r["transformer_calls"] == r["expected_calls"] == sum(generate_compute_step_map(r["level"], 10))
        assert r["recompiles"] == 0 and r["peak_memory_bytes"] > 0
        assert set(r["seconds"]) == {"text", "image", "denoise", "decode", "total"}
    assert all(r["speedup_vs_baseline"] > 0 for r in runs("1"))
    assert all(r["skip_cost_ratio"] >= 0 for r in runs("1") + runs("2") if r["level"] != "none")
    assert {r["accelerations"] for r in runs("2")} == {kit.SERVER_DEFAULT_GPU}
    assert all(r["compiles_in_warm_up"] >= 1 and "warm_up" in r["prepare_s"] for r in runs("2"))
    skipped = [r for r in parts["3"] if r["kind"] == "skipped"]
    assert [r["accelerations"] for r in skipped] == ["fp8+regional", "fp8-all+regional"]
    assert all("needs a CUDA GPU" in r["reason"] for r in skipped)
    cold, warm = [r for r in parts["4"] if r["kind"] == "restart"]
    for r in (cold, warm):
        assert r["ready_s"] >= r["import_s"] + r["build_s"] > 0 and "warm_up" in r["optimize_s"]
        assert r["first_edit"]["recompiles"] == 0
    assert [p["process"] for p in parts["4"] if p["kind"] == "part"] == ["restart (cold)", "restart"]
    assert {(tuple(r["size"]), r["level"]) for r in runs("5")} == {
        (size, level) for size in [(64, 64), (128, 128), (176, 176)] for level in ("none", "go really fast")
    }
    log = (out / "bench-gpu.log").read_text()
    assert "### Edits" in log and "### Restarts" in log and "not measured" in log
    table = bench_table.render(read_rows(*(out / f"part{n}.jsonl" for n in kit.SMOKE_PARTS)))
    assert "| 2 | 64x48 | 10 | regional | go really fast | 7 |" in table


def test_quick_runs_on_the_cpu_as_on_the_gpu(tmp_path):
    """`script/bench-gpu quick smoke`: the GPU command's three processes on the tiny model, on the CPU."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), BENCH_WORK=str(work), PYTHON=sys.executable)
    command = [str(ROOT / "script" / "bench-gpu"), "quick", "smoke"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-gpu.log", "quick-restart.jsonl", "quick-serve.jsonl", "quick.jsonl"]
    rows = read_rows(out / "quick.jsonl")
    assert not [r for r in rows if r["kind"] == "error"]
    items = {r["item"]: r for r in rows if r["kind"] in ("item", "skipped")}
    assert list(items) == [item.name for item in quick.plan("_native_math")]  # every item, in order
    done = [name for name, r in items.items() if r["kind"] == "item"]
    assert all(items[n]["status"] == "done" and items[n]["predicted_s"] >= 0 for n in done)
    skipped = {name: r["reason"] for name, r in items.items() if r["kind"] == "skipped"}
    assert set(skipped) == {name for name in items if "fp8" in name}  # fp8 needs a GPU; all else ran
    micro = {(r["op"], r.get("backend")) for r in rows if r["kind"] == "micro"}
    assert {("gemm", None), ("sdpa", "flash"), ("sdpa", "math")} <= micro
    runs = [r for r in rows if r["kind"] == "run"]
    assert [(r["accelerations"], r["level"], r["size"]) for r in runs] == [
        ("off", "none", [64, 48]),
        ("off", "go really fast", [64, 48]),
        ("regional", "none", [64, 48]),
        ("regional", "go really fast", [64, 48]),
        ("regional", "go really fast", [96, 96]),
        ("regional+attention=_native_math", "go really fast", [64, 48]),
    ]
    for r in runs:
        assert r["transformer_calls"] == sum(generate_compute_step_map(r["level"], 10)) and r["recompiles"] == 0
        assert r["floor_s"] > 0 and r["peak_memory_bytes"] > 0
    (base,) = [r for r in rows if r["kind"] == "baseline"]
    assert base["transformer_calls"] == 10 and runs[2]["speedup_vs_baseline"] > 0
    settings = [r for r in rows if r["kind"] == "setting"]
    assert [r["accelerations"] for r in settings] == ["regional", "regional+attention=_native_math"]
    assert all(r["compiles"] >= 1 and "warm_up" in r["prepare_s"] for r in settings)
    (restarted,) = [r for r in read_rows(out / "quick-restart.jsonl") if r["kind"] == "restart"]
    assert restarted["first_edit"]["recompiles"] == 0
    served = read_rows(out / "quick-serve.jsonl")
    assert [r["status"] for r in served if r["kind"] == "serve setup"] == ["READY"]
    assert [(r["level"], r["http"], r["status"]) for r in served if r["kind"] == "serve"] == [
        (level, 200, "succeeded") for level in ("none", "go fast", "go really fast")
    ]
    log = (out / "bench-gpu.log").read_text()
    assert "### Plan: predicted and taken" in log and "### The server on the device" in log


def test_the_quick_plan_fits_nine_minutes_on_an_h100():
    """Its predicted time from the FLOP counts and the rates it assumes, as docs/benchmarks.md gives it."""
    predicted = quick.predicted_plan()
    total = sum(seconds for _, seconds in predicted)
    assert total < 540
    assert f"{total:.0f} s" in (ROOT / "docs" / "benchmarks.md").read_text()
    main = kit.PARTS["quick"]
    in_main = total - quick.ASSUMED.restart_s - quick.ASSUMED.serve_s
    assert main.estimate_s == round(in_main) and in_main <= 540 - sum(kit.PARTS[n].reserve_s for n in kit.QUICK[1:])


def test_settings_go_only_forward_in_place():
    transformer = build_pipeline().transformer
    regional = AccelerationConfig.parse("regional")
    with pytest.raises(ValueError, match="cannot go from fp8-all\\+regional to fp8\\+regional"):
        quick.apply_in_place(
            transformer, AccelerationConfig.parse("fp8-all+regional"), AccelerationConfig.parse("fp8+regional")
        )
    with pytest.raises(ValueError, match="in place"):
        quick.apply_in_place(transformer, regional, AccelerationConfig.parse("fuse+regional"))
    seconds = quick.apply_in_place(transformer, regional, AccelerationConfig.parse("regional+attention=_native_math"))
    assert set(seconds) == {"attention"}


@pytest.mark.parametrize("name", list(kit.PARTS))
def test_every_part_parses_on_the_gpu_and_in_the_smoke_run(name):
    """The GPU arguments never run here: parse them with the tools' own parsers and the accelerations' parser."""
    part = kit.PARTS[name]
    parsers = {"measure.bench": bench.build_parser, "measure.restart": restart.build_parser}
    parsers |= {"measure.quick": quick.build_parser, "measure.serve_check": serve_check.build_parser}
    parsers |= {"measure.parallel": parallel.build_parser}
    parser = parsers[part.module]()
    for args, config in ((part.gpu_args, "full"), (part.smoke_args, "tiny")):
        parsed = parser.parse_args([a if a != kit.CACHE else "/tmp/cache" for a in args])
        if part.module == "measure.serve_check":
            assert parsed.device == ("cuda" if config == "full" else "cpu")
            continue
        assert parsed.config == config
        for spec in getattr(parsed, "accelerations", "off").split(","):
            assert isinstance(AccelerationConfig.parse(spec), AccelerationConfig), spec
        if config == "full":
            assert parsed.compile_backend == "inductor"
            assert getattr(parsed, "steps", 28) in ("28", 28)
            if part.module == "measure.bench":
                assert parsed.size == [(1024, 1024)] or parsed.megapixels == "0.25,1,2"
    assert part.estimate_s <= part.limit_s <= 480 and part.tail_s < part.limit_s


def test_the_plan_is_the_one_the_benchmarks_page_lists():
    gpu = {n: " ".join(p.gpu_args) for n, p in kit.PARTS.items()}
    assert "--accelerations off" in gpu["1"] and "--no-baseline" not in gpu["1"]
    assert "--warm-up served" in gpu["2"] and "--compile-cache" in gpu["2"] and kit.PARTS["2"].fresh_compile_cache
    assert "fp8+regional,fp8-all+regional" in gpu["3"]
    assert "--shapes served" in gpu["4"] and "--compile-cache" in gpu["4"]
    assert "--megapixels 0.25,1,2" in gpu["5"]
    # The server's GPU default, named here so that the CPU smoke run compiles too.
    assert kit.SERVER_DEFAULT_GPU == AccelerationConfig.default_for("cuda").describe()


def kit_args(tmp_path, deadline_s, smoke=False):
    return argparse.Namespace(
        out=str(tmp_path / "out"), work=str(tmp_path / "work"), deadline_s=deadline_s, smoke=smoke, argv=["x"]
    )


def test_a_part_without_the_time_it_needs_is_not_started(tmp_path):
    assert kit.Kit(kit_args(tmp_path, deadline_s=30)).run(["1"]) == 1
    (row,) = read_rows(tmp_path / "out" / "part1.jsonl")
    assert row["kind"] == "part" and row["process"] == "not started"


SLOW_TOOL = textwrap.dedent(
    """
    import argparse, json, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--jsonl")
    args, _ = parser.parse_known_args()
    with open(args.jsonl, "a") as f:
        row = {"kind": "run", "size": [64, 48], "steps": 10, "accelerations": "off", "level": "none"}
        f.write(json.dumps(row | {"seconds": {"total": 1.0}, "transformer_calls": 10}) + "\\n")
        f.flush()
        time.sleep(120)
    """
)


def test_a_part_past_its_limit_is_stopped_and_keeps_its_rows(tmp_path, monkeypatch):
    (tmp_path / "slow_tool.py").write_text(SLOW_TOOL)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    slow = kit.Part("9", "slow", "slow_tool", (), (), estimate_s=1, reserve_s=1, tail_s=1, limit_s=3)
    monkeypatch.setitem(kit.PARTS, "9", slow)
    assert kit.Kit(kit_args(tmp_path, deadline_s=60)).run(["9"]) == 1
    rows = read_rows(tmp_path / "out" / "part9.jsonl")
    assert [r["kind"] for r in rows] == ["run", "part"]
    assert rows[1]["timed_out"] and rows[1]["seconds"] < 30


def test_missing_libraries_without_carried_wheels_say_what_to_do(tmp_path):
    # A Python without site-packages stands in for the GPU image, which has neither diffusers nor torchao.
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    env = dict(os.environ, PYTHON=str(bare), OUT=str(tmp_path / "out"), BENCH_WHEELS=str(tmp_path / "none"))
    env["BENCH_SITE"] = str(tmp_path / "site")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(ROOT / "script" / "bench-gpu"), "3"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "cannot import: diffusers torchao" in proc.stderr and "script/fetch-wheels" in proc.stderr


def gpu_meta(run_id, **extra):
    return {
        "kind": "meta",
        "run_id": run_id,
        "device_type": "cuda",
        "config": "full",
        "device": "NVIDIA H100 80GB HBM3",
        "driver": "580",
        "torch": "2.11.0+cu130",
        **extra,
    }


def timed(kind, run_id, accelerations, level, total, **extra):
    return {
        "kind": kind,
        "run_id": run_id,
        "size": [1024, 1024],
        "steps": 28,
        "accelerations": accelerations,
        "level": level,
        "seconds": {"total": total},
        "transformer_calls": 28,
        **extra,
    }


def test_targets_are_judged_from_gpu_rows_only():
    cpu = {**gpu_meta("c"), "device_type": "cpu", "device": "x86_64"}
    rows = [
        gpu_meta("a"),
        timed("baseline", "a", "diffusers eager", "none", 12.0),
        timed("run", "a", "off", "none", 9.0, ratio_to_floor=1.5, speedup_vs_baseline=12 / 9, skip_cost_ratio=None),
        gpu_meta("b"),
        timed("run", "b", "fp8+regional", "go really fast", 1.2, ratio_to_floor=1.3, skip_cost_ratio=0.01),
        timed("run", "b", "fp8-all+regional", "go really fast", 1.3, ratio_to_floor=1.2, peak_memory_bytes=1),
        timed("run", "b", "regional", "go really fast", 2.0, skip_cost_ratio=0.03, peak_memory_bytes=30 * 2**30)
        | {"peak_reserved_bytes": 38 * 2**30},
        {"kind": "restart", "run_id": "b", "artifacts_found": True, "setup_beyond_build_s": 14.0},
        cpu,
        timed("run", "c", "off", "none", 0.1, ratio_to_floor=1.0),
    ]
    status = dict(bench_table.targets(rows))
    assert status["level none, bf16, accelerations off: within 1.15× of the floor"].startswith("NOT met (1.50×")
    assert status["go really fast + fp8 + compile: within 1.25× of its floor"].startswith(
        "met (1.20× the floor, 1.30 s, fp8-all+regional"
    )
    speedup = status["… and ≥ 3× faster than diffusers' eager pipeline"]
    assert speedup.startswith("met (10.0×, fp8+regional") and "another process" in speedup
    assert status["a skipped step costs < 2 % of a computed one"].startswith("NOT met (at most 3.00 %")
    assert status["peak GPU memory ≤ 40 GiB at 1 MP (the server's default, regional; reserved)"] == "met (38.0 GiB)"
    assert status["restart with compile artifacts: ready within weight-load time + 20 s"].startswith("met (14.0 s")
    table = "\n".join(bench_table.edits_table(rows))
    assert "| 10.00* |" in table  # the baseline came from another process on the same GPU
    assert all(s == "not measured" for s in dict(bench_table.targets(rows[-2:])).values())


def test_a_measuring_process_ends_itself_at_its_deadline(tmp_path):
    """Should the kit be stopped first, its part must not hold a lent GPU into the next command."""
    code = "from measure.records import exit_at_deadline; exit_at_deadline(); import time; time.sleep(60)"
    env = dict(os.environ, BENCH_DEADLINE_AT=repr(time.time() + 1))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 124 and time.perf_counter() - t0 < 30
    assert "rows written so far are kept" in proc.stderr
