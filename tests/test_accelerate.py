"""Accelerations: each switchable, off means untouched, compile serves new shapes without recompiling,
compile artifacts persist and a bad artifact never fails setup. GPU-only paths skip without CUDA."""

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from flux import accelerate
from flux.accelerate import AccelerationConfig, Fp8Scope, Shape
from flux.images import ASPECT_RATIO_SIZES
from flux.pipeline import EditRequest, KontextEditor
from tests.conftest import make_image

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
REQUEST = EditRequest("make the car red", make_image(64, 48), num_inference_steps=4, seed=1, acceleration="none")


def small_edit(editor, size=(64, 48)):
    return editor.edit_at_size(REQUEST, size, size)


@pytest.fixture
def fresh_editor(tiny_dir):
    """A newly loaded tiny editor, so accelerations never leak into the shared one."""

    def load(config):
        return KontextEditor.from_pretrained(tiny_dir, device="cpu", accelerations=config)

    return load


def test_everything_is_off_by_default_and_on_cpu():
    off = AccelerationConfig.off()
    assert off == AccelerationConfig() == AccelerationConfig.default_for("cpu")
    assert not (off.fuse_qkv or off.fp8 or off.compile or off.attention_backend)
    assert off.describe() == "off"
    assert AccelerationConfig.default_for("cuda").compile and AccelerationConfig.default_for("cuda").compile_regional
    assert not AccelerationConfig.default_for("cuda").fp8


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("off", AccelerationConfig()),
        ("compile", AccelerationConfig(compile=True)),
        ("fuse+fp8+compile", AccelerationConfig(fuse_qkv=True, fp8=True, compile=True)),
        ("fp8-all", AccelerationConfig(fp8=True, fp8_scope=Fp8Scope.ALL)),
        ("fp8+regional", AccelerationConfig(fp8=True, compile=True, compile_regional=True)),
        (
            "attention=_native_cudnn+mode=max-autotune",
            AccelerationConfig(attention_backend="_native_cudnn", compile=True, compile_mode="max-autotune"),
        ),
    ],
)
def test_parse_and_describe_round_trip(spec, expected):
    config = AccelerationConfig.parse(spec)
    assert config == expected
    assert AccelerationConfig.parse(config.describe()) == config


def test_parse_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown acceleration 'turbo'"):
        AccelerationConfig.parse("compile+turbo")


def test_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(accelerate.ENV_ACCELERATIONS, "fuse+compile")
    monkeypatch.setenv(accelerate.ENV_COMPILE_CACHE, str(tmp_path))
    assert AccelerationConfig.from_env("cpu") == AccelerationConfig(fuse_qkv=True, compile=True, cache_dir=tmp_path)
    monkeypatch.delenv(accelerate.ENV_ACCELERATIONS)
    monkeypatch.setenv(accelerate.ENV_COMPILE_CACHE, "")
    assert AccelerationConfig.from_env("cpu") == AccelerationConfig.off()


@pytest.mark.skipif(HAS_FP8_GPU, reason="checks the refusal on a machine without an fp8 GPU")
def test_fp8_is_refused_without_an_fp8_gpu(fresh_editor):
    with pytest.raises(ValueError, match="fp8 needs"):
        fresh_editor(AccelerationConfig(fp8=True))


def test_fp8_without_torchao_says_what_to_install(editor):
    try:
        import torchao  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchao is installed")
    with pytest.raises(ImportError, match="pip install -r requirements-gpu.txt"):
        accelerate.quantize_fp8(editor.c.transformer)


def test_attention_backend_without_its_package_says_what_to_install(fresh_editor):
    from diffusers.models.attention_dispatch import _CAN_USE_SAGE_ATTN

    if _CAN_USE_SAGE_ATTN:
        pytest.skip("sageattention is installed")
    with pytest.raises(RuntimeError, match="install `sageattention"):
        fresh_editor(AccelerationConfig(attention_backend="sage"))


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="unknown attention backend 'warp'"):
        AccelerationConfig(attention_backend="warp").validate("cpu")


def test_off_leaves_the_transformer_as_loaded(editor, fresh_editor):
    plain = fresh_editor(AccelerationConfig.off())
    assert type(plain.c.transformer.forward) is type(editor.c.transformer.forward)
    assert plain.c.transformer.state_dict().keys() == editor.c.transformer.state_dict().keys()
    torch.testing.assert_close(small_edit(plain).latents, small_edit(editor).latents, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config",
    [AccelerationConfig(fuse_qkv=True), AccelerationConfig(attention_backend="_native_math")],
    ids=["fuse_qkv", "attention=_native_math"],
)
def test_fusion_and_attention_backend_keep_the_result(editor, fresh_editor, config):
    accelerated = fresh_editor(config)
    if config.fuse_qkv:
        names = [name for name, _ in accelerated.c.transformer.named_modules()]
        assert any(name.endswith("attn.to_qkv") for name in names)
        assert any(name.endswith("attn.to_added_qkv") for name in names)
        assert not any(name.endswith(("attn.to_q", "attn.add_k_proj")) for name in names)  # not kept twice
    torch.testing.assert_close(small_edit(accelerated).latents, small_edit(editor).latents, rtol=1e-4, atol=1e-4)


def test_served_shapes_cover_every_aspect_ratio_and_preferred_resolution():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    shapes = accelerate.served_shapes()
    assert len(shapes) == len(set(shapes))
    assert {(s.width, s.height) for s in shapes} >= set(ASPECT_RATIO_SIZES.values())
    assert {Shape(w, h, w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS} <= set(shapes)


@pytest.mark.parametrize("regional", [False, True], ids=["whole model", "regional"])
def test_compiled_transformer_serves_new_shapes_without_recompiling(editor, fresh_editor, tmp_path, caplog, regional):
    # backend "eager": dynamo's guards, and so its recompiles, are the same as with inductor, without
    # minutes of C++ builds. The cache directory holds a corrupt artifact under the expected name:
    # setup must log it and compile as usual.
    config = AccelerationConfig(compile=True, compile_regional=regional, compile_backend="eager", cache_dir=tmp_path)
    compiled = fresh_editor(None)
    accelerate.artifact_path(tmp_path, compiled.c.transformer, config).write_bytes(b"\x00 not an artifact \xff" * 9)
    warm_shapes = [Shape(64, 48, 64, 48), Shape(96, 64, 64, 64)]
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.WARNING, logger="flux.accelerate"):
        accelerate.prepare(compiled.c.transformer, config, shapes=warm_shapes)
    assert "compiling" in caplog.text
    compiles = counters["stats"]["unique_graphs"] - before
    assert compiles >= 1
    for size in [(80, 80), (48, 112)]:  # token counts never seen in warm-up
        result = small_edit(compiled, size)
        torch.testing.assert_close(result.latents, small_edit(editor, size).latents, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - before == compiles, "a new shape recompiled"


# ---- persisted compile artifacts ----

LOAD_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from torch._dynamo.utils import counters
    from flux import accelerate
    from tests.test_accelerate import SmallModel
    loaded = accelerate.load_artifacts(sys.argv[1])
    model = SmallModel()
    model.compile(dynamic=True)
    with torch.inference_mode():
        model(torch.randn(5, 32))
    print("loaded", loaded, "hits", counters["aot_autograd"]["autograd_cache_hit"])
    """
)


class SmallModel(torch.nn.Module):
    """Compiles with inductor in seconds on the CPU (the tiny transformer takes over a minute)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def test_compile_artifacts_are_saved_and_reused_by_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-here"))
    torch._dynamo.reset()
    model = SmallModel()
    model.compile(dynamic=True)
    with torch.inference_mode():
        model(torch.randn(5, 32))
    path = tmp_path / "cache" / "artifacts.bin"
    assert accelerate.save_artifacts(path) and path.stat().st_size > 0

    # A fresh process with an empty inductor cache: only the saved artifacts can make it hit.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-there"))
    out = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded True hits 1" in out.stdout


def test_missing_or_corrupt_artifacts_are_ignored(tmp_path):
    assert not accelerate.load_artifacts(tmp_path / "missing.bin")
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"\x00 not a cache artifact \xff" * 10)
    assert not accelerate.load_artifacts(corrupt)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(b"")
    assert not accelerate.load_artifacts(truncated)


def test_artifact_name_changes_with_the_config(editor):
    a = accelerate.artifact_path("c", editor.c.transformer, AccelerationConfig(compile=True))
    b = accelerate.artifact_path("c", editor.c.transformer, AccelerationConfig(compile=True, fuse_qkv=True))
    same = accelerate.artifact_path("c", editor.c.transformer, dataclasses.replace(AccelerationConfig(compile=True)))
    assert a != b and a == same


# ---- GPU only ----


@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with compute capability >= 8.9")
def test_fp8_single_blocks_on_gpu(tiny_dir):
    pytest.importorskip("torchao")
    plain = KontextEditor.from_pretrained(tiny_dir, device="cuda")
    fp8 = KontextEditor.from_pretrained(tiny_dir, device="cuda")
    # The tiny model's layers are narrower than FP8_MIN_FEATURES, so lower the bar for this test.
    assert accelerate.quantize_fp8(fp8.c.transformer, Fp8Scope.SINGLE, min_features=16) > 0
    a, b = small_edit(fp8).latents, small_edit(plain).latents
    assert ((a - b).norm() / b.norm()).item() < 0.1


def test_fp8_filter_on_the_full_size_transformer():
    from flux.bench import full_size_models

    transformer = full_size_models("meta")["transformer"]
    modules = list(transformer.named_modules())
    single = [name for name, m in modules if accelerate.fp8_filter(Fp8Scope.SINGLE)(m, name)]
    every = [name for name, m in modules if accelerate.fp8_filter(Fp8Scope.ALL)(m, name)]
    # Per single-stream block: Q, K, V, MLP in, output; per double-stream block: Q, K, V and output for
    # each stream and both MLPs' two layers. Never the norms' modulation or the embedders.
    assert len(single) == 38 * 5
    assert len(every) == 38 * 5 + 19 * 12
    assert not any(".norm" in name for name in every)
    assert all(name.startswith(("transformer_blocks.", "single_transformer_blocks.")) for name in every)
