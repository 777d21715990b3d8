"""Several GPUs without the server: FLUX_GPUS and its settings, which setting no request could run with, the split
plan of every served shape at degrees 2, 4 and 8 with FLUX.1's dimensions, the kit's part for a machine with
several GPUs (run on two CPU processes) and the expected-speed estimates. The server itself, two processes on gloo:
tests/test_server_parallel.py."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flux.parallel import (
    ENV_CALL_TIMEOUT,
    ENV_GPUS,
    ENV_KIND,
    Kind,
    ParallelSettings,
    check_shapes,
    degree_for_all,
    describe_plans,
    shares,
    split_plan,
    ulysses_splits_heads,
)
from flux.pipeline import served_shapes
from flux.tiny import FULL
from measure.floors import full_config
from measure.parallel import NVLINK_H100, estimate, exchanged_bytes
from measure.records import read_rows

HEADS, TEXT = FULL.num_attention_heads, 512
ROOT = Path(__file__).resolve().parent.parent


def test_one_gpu_is_the_default_and_all_without_a_gpu_is_one_process(monkeypatch):
    monkeypatch.delenv(ENV_GPUS, raising=False)
    assert ParallelSettings.from_env("cpu") == ParallelSettings()
    assert not ParallelSettings.from_env("cpu").enabled
    monkeypatch.setenv(ENV_GPUS, "all")
    assert ParallelSettings.from_env("cpu").degree == 1  # no GPU: one process
    monkeypatch.setenv(ENV_GPUS, "2")
    monkeypatch.setenv(ENV_KIND, "ring")
    monkeypatch.setenv(ENV_CALL_TIMEOUT, "7.5")
    settings = ParallelSettings.from_env("cpu")
    assert (settings.degree, settings.kind, settings.call_timeout_s, settings.describe()) == (
        2,
        Kind.RING,
        7.5,
        "ring-2",
    )


@pytest.mark.parametrize(
    "visible,degree", [(0, 1), (1, 1), (2, 2), (3, 2), (4, 4), (5, 4), (6, 4), (7, 4), (8, 8), (12, 8), (16, 8)]
)
def test_all_takes_the_largest_of_8_4_2_1_that_the_visible_gpus_fit(monkeypatch, caplog, visible, degree):
    """A power of two divides every call's 512 text tokens: any other degree would run every call uneven."""
    assert degree_for_all(visible) == degree
    assert not ulysses_splits_heads(HEADS, 16)  # why 8 at most
    monkeypatch.setenv(ENV_GPUS, "all")
    with caplog.at_level(logging.INFO, logger="flux.parallel"):
        assert ParallelSettings.from_env("cuda" if visible else "cpu", visible=visible).degree == degree
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{ENV_GPUS}=all")]
    if not visible:
        assert lines == []
    elif visible == degree:
        assert lines == [f"{ENV_GPUS}=all: {degree} GPUs, every one torch sees"]
    elif visible > 8:
        assert lines == [
            f"{ENV_GPUS}=all: 8 of the {visible} GPUs torch sees: 8 at most (Ulysses cannot split FLUX.1's 24 "
            "attention heads over 16)"
        ]
    else:
        assert lines == [
            f"{ENV_GPUS}=all: {degree} of the {visible} GPUs torch sees: a power of two divides every call's 512 "
            f"text tokens; over {visible} every call would take the uneven split (eager, no compile)"
        ]


@pytest.mark.parametrize("gpus,suggested", [(3, 2), (5, 4), (6, 4), (7, 4), (12, 8)])
def test_a_degree_the_text_tokens_do_not_divide_warns_at_setup_what_it_costs(monkeypatch, caplog, gpus, suggested):
    monkeypatch.setenv(ENV_GPUS, str(gpus))
    with caplog.at_level(logging.WARNING, logger="flux.parallel"):
        assert ParallelSettings.from_env("cuda", visible=16).degree == gpus
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        f"{ENV_GPUS}={gpus}: {gpus} does not divide the 512 text tokens of every transformer call, so every call "
        "takes diffusers' uneven split, which runs eagerly (no compile) and exchanges the share sizes inside each "
        f"attention; {ENV_GPUS}={suggested} (a power of two) splits the text evenly and runs compiled for every "
        f"size whose image tokens divide by {suggested} too"
    )


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_a_power_of_two_sets_up_without_a_warning(monkeypatch, caplog, gpus):
    monkeypatch.setenv(ENV_GPUS, str(gpus))
    with caplog.at_level(logging.WARNING, logger="flux.parallel"):
        assert ParallelSettings.from_env("cuda", visible=8).degree == gpus
    assert not caplog.records


@pytest.mark.parametrize(
    "name,value",
    [(ENV_GPUS, "0"), (ENV_GPUS, "two"), (ENV_GPUS, "-1"), (ENV_KIND, "tensor"), (ENV_CALL_TIMEOUT, "0")],
)
def test_a_bad_setting_names_its_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        ParallelSettings.from_env("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for more GPUs than there are")
def test_more_gpus_than_torch_sees_is_refused(monkeypatch):
    monkeypatch.setenv(ENV_GPUS, "2")
    with pytest.raises(ValueError, match="torch sees 0"):
        ParallelSettings.from_env("cuda")


def test_ulysses_splits_flux_heads_over_2_to_8_ranks_except_7():
    assert [d for d in range(2, 9) if ulysses_splits_heads(HEADS, d)] == [2, 3, 4, 5, 6, 8]
    ParallelSettings(degree=8).check(HEADS, None)
    with pytest.raises(ValueError, match=f"cannot split the model's {HEADS} attention heads.*{ENV_KIND}=ring"):
        ParallelSettings(degree=7).check(HEADS, None)
    with pytest.raises(ValueError, match="1 attention heads"):  # flux.tiny's single head
        ParallelSettings(degree=2).check(1, None)


@pytest.mark.parametrize("attention", [None, "native"])
def test_ring_needs_an_attention_backend_that_returns_the_log_sum_exp(attention):
    with pytest.raises(ValueError, match="log-sum-exp.*attention=_native_cudnn"):
        ParallelSettings(degree=2, kind=Kind.RING).check(HEADS, attention)
    ParallelSettings(degree=2, kind=Kind.RING).check(HEADS, "_native_cudnn")


def test_shares_are_torch_tensor_split_s():
    for tokens in (4096, 4097, 4099, 8):
        for degree in (2, 3, 4, 8):
            assert shares(tokens, degree) == [len(c) for c in torch.arange(tokens).tensor_split(degree)]


@pytest.mark.parametrize("degree,uneven", [(2, 76), (4, 164), (8, 201)])
@pytest.mark.parametrize("kind", list(Kind))
def test_every_served_shape_has_a_plan_at_2_4_and_8(degree, uneven, kind):
    """No served size is refused at request time: an even split where the degree divides the token counts, the
    uneven one elsewhere (the counts are the module docstring's)."""
    settings = ParallelSettings(degree=degree, kind=kind)
    shapes = served_shapes()
    plans = [split_plan(settings, HEADS, sum(s.tokens()), TEXT) for s in shapes]
    for plan in plans:
        assert sum(plan.image_shares()) == plan.image_tokens
        assert plan.uneven == (plan.image_tokens % degree != 0)  # 512 text tokens and 24 heads divide
    assert (len(shapes), sum(p.uneven for p in plans)) == (242, uneven)
    lines = describe_plans(settings, HEADS, shapes, TEXT)
    assert len(lines) == 1 + len(shapes)
    assert lines[0].endswith(f"{242 - uneven} of 242 served shapes split evenly, {uneven} unevenly; 24 attention heads")
    assert "1024x1024 from 1024x1024: 8192 image + 512 text tokens" in "\n".join(lines)
    checks = check_shapes(settings, HEADS, shapes, TEXT)
    assert [split_plan(settings, HEADS, sum(s.tokens()), TEXT).uneven for s in checks] == [False, True]


def test_ulysses_plans_the_uneven_split_for_heads_the_degree_does_not_divide():
    plan = split_plan(ParallelSettings(degree=5), HEADS, 4096 + 4096, TEXT)
    assert plan.uneven and "ulysses_anything" in plan.describe()
    assert not split_plan(ParallelSettings(degree=5, kind=Kind.RING), HEADS, 8190, 510).uneven


def test_the_kit_s_parallel_part_runs_two_cpu_processes_with_regional_compile(tmp_path):
    """script/bench-gpu parallel, as on a machine with several GPUs but on two CPU processes with the tiny model
    (two heads) and dynamo's eager backend: the even split traced and compiled, the uneven one run eagerly, both
    within float rounding of one process."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BENCH_WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    command = [str(ROOT / "script" / "bench-gpu"), "parallel", "smoke"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out / "parallel.jsonl")
    assert not [r for r in rows if r["kind"] == "error"]
    calls = [r for r in rows if r["kind"] == "parallel"]
    assert sorted((r["degree"], r["split"]) for r in calls) == [(1, "-"), (1, "-"), (2, "even"), (2, "uneven")]
    checks = [r for r in rows if r["kind"] == "parallel_check"]
    assert len(checks) == 2 and all(r["relative_l2"] < 1e-5 for r in checks), checks
    assert "| regional | 64x48 from 48x48 | 21 | 2 | ulysses | uneven |" in proc.stdout


def test_the_expected_speed_table_s_figures():
    """The estimates docs/several-gpus.md and docs/benchmarks.md quote (measure.parallel --plan)."""
    config = full_config()
    tokens = 8192  # 1024² output and context
    assert exchanged_bytes(Kind.ULYSSES, 2, config, tokens) / 1e6 == pytest.approx(3048, abs=1)
    for degree in (2, 4, 8):
        ring, ulysses = (exchanged_bytes(kind, degree, config, tokens) for kind in (Kind.RING, Kind.ULYSSES))
        assert ring / ulysses == pytest.approx(degree / 2)
    one = estimate(1, Kind.ULYSSES, (1024, 1024)).call_s[NVLINK_H100.name]
    speedups = [one / estimate(d, Kind.ULYSSES, (1024, 1024)).call_s[NVLINK_H100.name] for d in (2, 4, 8)]
    assert [round(s, 2) for s in speedups] == [1.85, 3.51, 6.57]
