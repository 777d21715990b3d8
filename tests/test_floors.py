"""The floor of a call: FLOPs counted (against torch's own counter and the full model's known figure) and split
where fp8 applies (checked against the layers fp8 quantises), each kind of work at its own rate."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flux import optimize, sampling
from flux.optimize import Fp8Scope
from flux.tiny import build_pipeline
from measure import floors


def call_tiny(transformer, h: int, w: int) -> None:
    """One call of a tiny transformer on an h × w latent (and a context image of the same size)."""
    n = (h // 2) * (w // 2)
    ids = torch.cat([sampling.position_ids(h, w, 0), sampling.position_ids(h, w, 1)])
    with torch.inference_mode():
        transformer(
            hidden_states=torch.randn(1, 2 * n, 64),
            encoder_hidden_states=torch.randn(1, 512, 32),
            pooled_projections=torch.randn(1, 32),
            timestep=torch.full((1,), 0.5),
            img_ids=ids,
            txt_ids=torch.zeros(512, 3),
            guidance=torch.full((1,), 2.5),
            return_dict=False,
        )


def test_full_model_flops_per_call_at_one_megapixel():
    # 1024² Kontext edit: 4096 noise + 4096 context tokens, 512 text tokens.
    flops = floors.transformer_flops(floors.full_config(), image_tokens=8192, text_tokens=512)
    assert flops.matmul == pytest.approx(112.4e12, rel=2e-3)
    assert flops.attention == pytest.approx(53.06e12, rel=2e-3)
    assert flops.total == pytest.approx(165.5e12, rel=2e-3)


def test_flop_count_matches_torch_flop_counter_on_the_tiny_transformer():
    transformer = build_pipeline().transformer
    transformer.set_attention_backend("_native_math")  # attention as matmuls, which the counter sees
    with FlopCounterMode(display=False) as counter:
        call_tiny(transformer, 6, 8)
    assert floors.transformer_flops(dict(transformer.config), 2 * 12, 512).total == counter.get_total_flops()


def test_the_split_is_where_fp8_quantises():
    """Each linear layer's FLOPs, added up by where fp8 would put it, against the count's split."""
    transformer = build_pipeline().transformer
    single = optimize.fp8_filter(Fp8Scope.SINGLE, min_features=1)
    every = optimize.fp8_filter(Fp8Scope.ALL, min_features=1)
    counted = {"single": 0.0, "double": 0.0, "other": 0.0}
    handles = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            scope = "single" if single(module, name) else "double" if every(module, name) else "other"

            def count(m, args, out, scope=scope):
                counted[scope] += 2 * args[0].numel() * m.out_features

            handles.append(module.register_forward_hook(count))
    call_tiny(transformer, 8, 8)
    for handle in handles:
        handle.remove()
    flops = floors.transformer_flops(dict(transformer.config), 2 * 16)
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


def test_an_fp8_floor_without_a_measured_fp8_rate_says_it_assumed_one():
    measured = floors.Rates(gemm=7.0, sdpa=5.0)
    assert floors.for_setting(measured, None) is measured
    fp8 = floors.for_setting(measured, "all")
    assert fp8.fp8_gemm == floors.ASSUMED_H100.fp8_gemm and "fp8 GEMM assumed" in fp8.source
