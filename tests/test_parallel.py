"""Several GPUs, in the process: FLUX_GPUS and its settings, which setting no request could run with, and the
split plan of every served shape at degrees 2, 4 and 8 with FLUX.1's dimensions (the server tests run the real
thing, two processes on gloo: tests/test_server_parallel.py)."""

import pytest
import torch

from flux.parallel import (
    ENV_CALL_TIMEOUT,
    ENV_GPUS,
    ENV_KIND,
    Kind,
    ParallelSettings,
    check_shapes,
    describe_plans,
    shares,
    split_plan,
    ulysses_splits_heads,
)
from flux.pipeline import served_shapes
from flux.tiny import FULL

HEADS, TEXT = FULL.num_attention_heads, 512


def test_one_gpu_is_the_default_and_all_means_every_gpu_torch_sees(monkeypatch):
    monkeypatch.delenv(ENV_GPUS, raising=False)
    assert ParallelSettings.from_env("cpu") == ParallelSettings()
    assert not ParallelSettings.from_env("cpu").enabled
    monkeypatch.setenv(ENV_GPUS, "all")
    assert ParallelSettings.from_env("cpu").degree == 1  # no GPU: one process
    monkeypatch.setenv(ENV_GPUS, "2")
    monkeypatch.setenv(ENV_KIND, "ring")
    monkeypatch.setenv(ENV_CALL_TIMEOUT, "7.5")
    settings = ParallelSettings.from_env("cpu")
    assert (settings.degree, settings.kind, settings.call_timeout_s, settings.describe()) == (2, Kind.RING, 7.5, "ring-2")


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
