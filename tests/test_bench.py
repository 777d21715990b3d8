"""The benchmark: the full-size model's dimensions without allocating it, rows written as they are measured, the
time budget, and settings that cannot run here. The whole plan runs on the CPU in tests/test_kit.py."""

import pytest
import torch

from flux.tiny import FULL, build_pipeline
from measure import bench, timing
from measure.records import RowWriter, read_rows


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
        timing.build_components("full", torch.device("cpu"))


def test_megapixel_sizes():
    assert timing.megapixel_size(0.25) == (512, 512)
    assert timing.megapixel_size(1) == (1024, 1024)
    assert timing.megapixel_size(2) == (1456, 1456)


def test_budget_spent_skips_every_row_and_keeps_the_rest(tmp_path, capsys):
    """With no time left, the run still writes what it ran on and what it left out, and succeeds."""
    out = tmp_path / "rows.jsonl"
    args = ["--config", "tiny", "--steps", "10", "--size", "64x48", "--repeats", "1", "--budget", "0"]
    assert bench.main([*args, "--accelerations", "off,fuse", "--jsonl", str(out), "--part", "x"]) == 0
    rows = read_rows(out)
    assert [r["kind"] for r in rows] == ["meta", "build", "skipped", "skipped", "skipped", "end"]
    assert all(r["part"] == "x" and r["run_id"] == rows[0]["run_id"] for r in rows)
    meta = rows[0]
    assert meta["config"] == "tiny" and "--budget 0" in meta["command"]
    assert meta["versions"]["diffusers"] and meta["torch"] == torch.__version__
    micro = {(r["op"], r.get("backend")): r for r in rows[1]["micro"]}
    assert micro["gemm", None]["flops_per_s"] > 0 and micro["sdpa", "flash"]["flops_per_s"] > 0
    assert micro["sdpa", "flash"]["tokens"] == 2 * 12 + 512  # 64x48: 12 noise + 12 context + 512 text tokens
    assert "time budget" in rows[2]["reason"] and rows[2]["accelerations"] == "diffusers eager"
    assert {r["accelerations"] for r in rows[3:5]} == {"off", "fuse"}
    assert "skipped" in capsys.readouterr().out


def test_a_setting_that_cannot_run_here_is_skipped_and_the_others_run(tmp_path):
    out = tmp_path / "rows.jsonl"
    args = ["--config", "tiny", "--steps", "10", "--size", "32x32", "--repeats", "1", "--no-baseline"]
    specs = "fp8+regional,fuse"
    assert bench.main([*args, "--levels", "go really fast", "--accelerations", specs, "--jsonl", str(out)]) == 0
    rows = read_rows(out)
    (skipped,) = [r for r in rows if r["kind"] == "skipped"]
    assert skipped["accelerations"] == "fp8+regional" and "needs a CUDA GPU" in skipped["reason"]
    (run,) = [r for r in rows if r["kind"] == "run"]
    assert run["accelerations"] == "fuse" and run["transformer_calls"] == run["expected_calls"]
    assert run["skip_cost_ratio"] >= 0 and "speedup_vs_baseline" not in run
    assert rows[-1] == rows[-1] | {"kind": "end", "errors": 0}


def test_each_setting_starts_from_the_same_eager_weights():
    transformer = build_pipeline().transformer
    original = {k: v.clone() for k, v in transformer.state_dict().items()}
    source = timing.TransformerSource(transformer)
    assert source.get(modifies=False, needed_later=True) is transformer
    assert source._state is None  # nothing changed it: no copy was needed
    first = source.get(modifies=True, needed_later=True)
    with torch.no_grad():
        next(first.parameters()).add_(1.0)  # as fusion, fp8 or compile change it in place
    first = None
    second = source.get(modifies=True, needed_later=False)
    assert second is not transformer
    for k, v in second.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=0)


def test_rows_are_on_disk_as_soon_as_they_are_written(tmp_path):
    path = tmp_path / "rows.jsonl"
    writer = RowWriter(path, run_id="r")
    writer.write("meta", device="cpu")
    writer.write("run", seconds={"total": 1.0})
    assert [r["kind"] for r in read_rows(path)] == ["meta", "run"]  # before close(): a killed run keeps them
    with path.open("a") as f:
        f.write('{"kind": "run", "seconds": {"tot')  # a line cut off when the process was killed
    assert len(read_rows(path)) == 2
    writer.close()
