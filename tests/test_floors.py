"""The floor of a call: FLOPs split where fp8 applies (checked against the layers fp8 quantises), each kind of
work at its own rate."""

import pytest
import torch

from flux import optimize, sampling
from flux.optimize import Fp8Scope
from flux.tiny import build_pipeline
from measure import floors


def linear_flops_by_scope(transformer, image_tokens: int) -> dict[str, float]:
    """Run the tiny transformer once and add up each linear layer's FLOPs, by where fp8 would put it."""
    single = optimize.fp8_filter(Fp8Scope.SINGLE, min_features=1)
    every = optimize.fp8_filter(Fp8Scope.ALL, min_features=1)
    totals = {"single": 0.0, "double": 0.0, "other": 0.0}
    handles = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            scope = "single" if single(module, name) else "double" if every(module, name) else "other"

            def count(m, args, out, scope=scope):
                totals[scope] += 2 * args[0].numel() // m.in_features * m.in_features * m.out_features

            handles.append(module.register_forward_hook(count))
    n = image_tokens // 2
    h = w = int(n**0.5) * 2
    ids = torch.cat([sampling.position_ids(h, w, 0), sampling.position_ids(h, w, 1)])
    with torch.inference_mode():
        transformer(
            hidden_states=torch.randn(1, image_tokens, 64),
            encoder_hidden_states=torch.randn(1, 512, 32),
            pooled_projections=torch.randn(1, 32),
            timestep=torch.full((1,), 0.5),
            img_ids=ids,
            txt_ids=torch.zeros(512, 3),
            guidance=torch.full((1,), 2.5),
            return_dict=False,
        )
    for handle in handles:
        handle.remove()
    return totals


def test_the_split_is_where_fp8_quantises():
    transformer = build_pipeline().transformer
    image_tokens = 2 * 4 * 4
    counted = linear_flops_by_scope(transformer, image_tokens)
    flops = floors.transformer_flops(dict(transformer.config), image_tokens)
    assert (flops.single, flops.double, flops.other) == (counted["single"], counted["double"], counted["other"])


def test_each_kind_of_work_at_its_own_rate():
    flops = floors.transformer_flops(floors.full_config(), floors.image_tokens((1024, 1024)))
    assert flops.matmul == pytest.approx(112.4e12, rel=2e-3) and flops.attention / flops.total == pytest.approx(
        0.32, abs=0.005
    )
    rates = floors.Rates(gemm=700e12, sdpa=500e12, fp8_gemm=1400e12)
    bf16 = floors.call_floor(flops, rates)
    assert bf16 == pytest.approx(flops.matmul / 700e12 + flops.attention / 500e12)
    single = floors.call_floor(flops, rates, "single")
    every = floors.call_floor(flops, rates, "all")
    assert bf16 - single == pytest.approx(flops.single / 1400e12)
    assert single - every == pytest.approx(flops.double / 1400e12)
    # one rate for everything (the old floor) sits below the honest one when attention is slower
    assert flops.total / rates.gemm < bf16
    with pytest.raises(ValueError, match="fp8 GEMM rate"):
        floors.call_floor(flops, floors.Rates(gemm=1.0, sdpa=1.0), "single")


def test_two_megapixels_are_half_attention():
    flops = floors.transformer_flops(floors.full_config(), floors.image_tokens((1456, 1456)))
    assert flops.attention / flops.total == pytest.approx(0.48, abs=0.005)


def test_rates_come_from_the_best_backend_measured_at_the_size():
    rows = [
        {"op": "gemm", "flops_per_s": 7.0},
        {"op": "sdpa", "backend": "flash", "tokens": 8704, "flops_per_s": 3.0},
        {"op": "sdpa", "backend": "cudnn", "tokens": 8704, "flops_per_s": 5.0},
        {"op": "sdpa", "backend": "cudnn", "tokens": 17074, "flops_per_s": 6.0},
        {"op": "sdpa", "backend": "efficient", "tokens": 8704, "error": "no kernel"},
    ]
    assert floors.rates_from(rows, 8704) == floors.Rates(gemm=7.0, sdpa=5.0)
    assert floors.rates_from(rows, 2560).sdpa == 6.0  # not measured there: the best anywhere
