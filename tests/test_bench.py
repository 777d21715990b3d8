"""The benchmark: FLOP counting (against torch's own counter and the full model's known figure), the
full-size model's dimensions without allocating it, and a CPU smoke run of the whole command."""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flux import sampling
from flux.taylor_seer_utils import AccelerationLevel, generate_compute_step_map
from flux.tiny import FULL, build_pipeline
from measure import bench


def test_full_model_flops_per_call_at_one_megapixel():
    # 1024² Kontext edit: 4096 noise + 4096 context tokens, 512 text tokens.
    config = dict(build_pipeline(FULL, "meta", torch.bfloat16).transformer.config)
    flops = bench.transformer_flops(config, image_tokens=8192, text_tokens=512)
    assert flops.matmul == pytest.approx(112.4e12, rel=2e-3)
    assert flops.attention == pytest.approx(53.06e12, rel=2e-3)
    assert flops.total == pytest.approx(165.5e12, rel=2e-3)


def test_flop_count_matches_torch_flop_counter_on_the_tiny_transformer():
    transformer = build_pipeline().transformer
    transformer.set_attention_backend("_native_math")  # attention as matmuls, which the counter sees
    h, w = 6, 8
    n = (h // 2) * (w // 2)
    ids = torch.cat([sampling.position_ids(h, w, 0), sampling.position_ids(h, w, 1)])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
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
    assert bench.transformer_flops(dict(transformer.config), 2 * n, 512).total == counter.get_total_flops()


def test_full_size_models_have_flux_kontext_dimensions_without_allocating():
    pipe = build_pipeline(FULL, "meta", torch.bfloat16)
    models = {name: getattr(pipe, name) for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert params["transformer"] == pytest.approx(11.9e9, rel=0.01)  # FLUX.1: 12B
    assert params["text_encoder_2"] == pytest.approx(4.76e9, rel=0.01)  # T5-XXL encoder
    assert params["text_encoder"] == pytest.approx(123e6, rel=0.01)  # CLIP-L text
    assert params["vae"] == pytest.approx(83.8e6, rel=0.01)
    assert models["vae"].config.latent_channels == 16
    assert all(p.dtype == torch.bfloat16 for m in models.values() for p in m.parameters())


def test_full_config_is_refused_on_the_cpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.build_components("full", torch.device("cpu"))


def test_megapixel_sizes():
    assert bench.megapixel_size(0.25) == (512, 512)
    assert bench.megapixel_size(1) == (1024, 1024)
    assert bench.megapixel_size(2) == (1456, 1456)


def test_tiny_smoke_run(tmp_path, capsys):
    """The CI smoke test: every level with accelerations off and with QKV fusion, baseline included."""
    out = tmp_path / "bench.json"
    steps = 10
    args = ["--config", "tiny", "--steps", str(steps), "--size", "64x48", "--repeats", "1"]
    assert bench.main([*args, "--accelerations", "off,fuse", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["matmul"]["flops_per_s"] > 0
    assert "--config tiny" in report["meta"]["command"]
    (entry,) = report["results"]
    assert entry["tokens"] == {"noise": 12, "context": 12, "text": 512}
    base = entry["baseline"]
    assert base["transformer_calls"] == steps
    assert base["floor_s"] > 0 and math.isfinite(base["ratio_to_floor"])
    runs = {(r["accelerations"], r["level"]): r for r in entry["runs"]}
    assert set(runs) == {(a, level.value) for a in ("off", "fuse") for level in AccelerationLevel}
    for (_, level), r in runs.items():
        assert r["transformer_calls"] == r["expected_calls"] == sum(generate_compute_step_map(level, steps))
        assert r["floor_s"] == pytest.approx(
            r["transformer_calls"] * entry["flops_per_call"]["total"] / report["meta"]["matmul"]["flops_per_s"]
        )
        assert r["speedup_vs_baseline"] > 0 and r["ratio_to_floor"] > 0
        assert set(r["seconds"]) == {"text", "image", "denoise", "decode", "total"}
        assert r["recompiles"] == 0 and r["peak_memory_bytes"] > 0
        if level != "none":
            assert r["skip_cost_ratio"] is not None and r["skip_cost_ratio"] >= 0
    table = capsys.readouterr().out
    assert "diffusers eager" in table and "go really fast" in table
