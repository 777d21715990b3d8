"""Accelerations: each switchable, off means untouched, compile serves new shapes without recompiling,
compile artifacts persist and a bad artifact never fails setup. GPU-only paths skip without CUDA."""

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from flux import optimize
from flux.images import ASPECT_RATIO_SIZES, scale_size
from flux.optimize import AccelerationConfig, CompileScope, Fp8Scope, Shape
from flux.pipeline import MAX_EXTRA_IMAGES, EditRequest, KontextEditor, served_shapes
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
    off = AccelerationConfig()
    assert off == AccelerationConfig.default_for("cpu") == optimize.resolve("default", "cpu")
    assert not (off.fuse_qkv or off.fp8 or off.compile or off.attention)
    assert off.describe() == "off"
    assert AccelerationConfig.default_for("cuda").compile is CompileScope.REGIONAL
    assert optimize.resolve("default", "cuda") == AccelerationConfig.default_for("cuda")
    assert not AccelerationConfig.default_for("cuda").fp8


def test_default_is_resolved_from_the_transformers_own_device(editor):
    assert AccelerationConfig.parse("default") == "default"
    assert optimize.apply(editor.components.transformer, "default") == AccelerationConfig()  # on the CPU: off


def test_invalid_combinations_cannot_be_written():
    with pytest.raises(ValueError, match="compile mode needs compile"):
        AccelerationConfig(compile_mode="max-autotune")
    with pytest.raises(ValueError, match="compile mode must be one of"):
        AccelerationConfig(compile=CompileScope.WHOLE, compile_mode="turbo")
    with pytest.raises(ValueError):
        AccelerationConfig(fp8="half")
    with pytest.raises(TypeError, match="accelerations must be"):
        optimize.resolve("fuse", "cpu")  # a spec is parsed first


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("off", AccelerationConfig()),
        ("compile", AccelerationConfig(compile=CompileScope.WHOLE)),
        ("fuse+fp8+compile", AccelerationConfig(fuse_qkv=True, fp8=Fp8Scope.SINGLE, compile=CompileScope.WHOLE)),
        ("fp8-all", AccelerationConfig(fp8=Fp8Scope.ALL)),
        ("fp8+regional", AccelerationConfig(fp8=Fp8Scope.SINGLE, compile=CompileScope.REGIONAL)),
        (
            "attention=_native_cudnn+mode=max-autotune",
            AccelerationConfig(attention="_native_cudnn", compile=CompileScope.WHOLE, compile_mode="max-autotune"),
        ),
        (
            "regional+mode=max-autotune-no-cudagraphs",
            AccelerationConfig(compile=CompileScope.REGIONAL, compile_mode="max-autotune-no-cudagraphs"),
        ),
        (
            "compile+mode=reduce-overhead",
            AccelerationConfig(compile=CompileScope.WHOLE, compile_mode="reduce-overhead"),
        ),
    ],
)
def test_parse_and_describe_round_trip(spec, expected):
    config = AccelerationConfig.parse(spec)
    assert config == expected
    assert AccelerationConfig.parse(config.describe()) == config


@pytest.mark.parametrize("mode", optimize.CUDA_GRAPH_MODES)
def test_cuda_graphs_are_refused_with_regional_dynamic_compile(mode):
    with pytest.raises(ValueError, match="records CUDA graphs"):
        AccelerationConfig.parse(f"regional+mode={mode}")


def test_fp8_needs_compile():
    for spec in ("fp8", "fp8-all", "fuse+fp8"):
        with pytest.raises(ValueError, match="fp8 needs compile on"):
            AccelerationConfig.parse(spec).validate("cpu")


def test_parse_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown acceleration 'turbo'"):
        AccelerationConfig.parse("compile+turbo")


def test_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(optimize.ENV_ACCELERATIONS, "fuse+compile")
    monkeypatch.setenv(optimize.ENV_COMPILE_CACHE, str(tmp_path))
    assert optimize.accelerations_from_env() == AccelerationConfig(fuse_qkv=True, compile=CompileScope.WHOLE)
    assert optimize.compile_cache_from_env("weights/x") == tmp_path
    monkeypatch.delenv(optimize.ENV_ACCELERATIONS)
    monkeypatch.setenv(optimize.ENV_COMPILE_CACHE, "")
    assert optimize.accelerations_from_env() == "default"
    assert optimize.compile_cache_from_env("weights/x") is None
    monkeypatch.delenv(optimize.ENV_COMPILE_CACHE)
    assert optimize.compile_cache_from_env("weights/x") == Path("weights/x/compile-cache")  # ships with the weights


@pytest.mark.skipif(HAS_FP8_GPU, reason="checks the refusal on a machine without an fp8 GPU")
def test_fp8_is_refused_without_an_fp8_gpu(fresh_editor):
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU"):
        fresh_editor(AccelerationConfig(fp8=Fp8Scope.SINGLE, compile=CompileScope.REGIONAL))


def test_fp8_without_torchao_says_what_to_install(editor):
    try:
        import torchao  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchao is installed")
    with pytest.raises(ImportError, match="pip install -r requirements-gpu.txt"):
        optimize.quantize_fp8(editor.components.transformer)


def test_attention_backend_without_its_package_says_what_to_install(fresh_editor):
    from diffusers.models.attention_dispatch import _CAN_USE_SAGE_ATTN

    if _CAN_USE_SAGE_ATTN:
        pytest.skip("sageattention is installed")
    with pytest.raises(ValueError, match="install `sageattention"):
        fresh_editor(AccelerationConfig(attention="sage"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a backend this machine cannot run")
def test_an_unusable_attention_backend_is_refused_before_the_model_changes(editor):
    transformer = editor.components.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(ValueError, match="attention backend '_native_cudnn' cannot run on cpu"):
        optimize.apply(transformer, AccelerationConfig(fuse_qkv=True, attention="_native_cudnn"))
    assert not any(getattr(m, "fused_projections", False) for m in transformer.modules())  # not fused first
    assert transformer.state_dict().keys() == before.keys()


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="unknown attention backend 'warp'"):
        AccelerationConfig(attention="warp").validate("cpu")


def test_off_leaves_the_transformer_as_loaded(editor, fresh_editor):
    plain = fresh_editor(AccelerationConfig())
    assert type(plain.components.transformer.forward) is type(editor.components.transformer.forward)
    assert plain.components.transformer.state_dict().keys() == editor.components.transformer.state_dict().keys()
    torch.testing.assert_close(small_edit(plain).latents, small_edit(editor).latents, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config",
    [AccelerationConfig(fuse_qkv=True), AccelerationConfig(attention="_native_math")],
    ids=["fuse_qkv", "attention=_native_math"],
)
def test_fusion_and_attention_backend_keep_the_result(editor, fresh_editor, config):
    accelerated = fresh_editor(config)
    if config.fuse_qkv:
        names = [name for name, _ in accelerated.components.transformer.named_modules()]
        assert any(name.endswith("attn.to_qkv") for name in names)
        assert any(name.endswith("attn.to_added_qkv") for name in names)
        assert not any(name.endswith(("attn.to_q", "attn.add_k_proj")) for name in names)  # not kept twice
    torch.testing.assert_close(small_edit(accelerated).latents, small_edit(editor).latents, rtol=1e-4, atol=1e-4)


def test_served_shapes_cover_every_aspect_ratio_resolution_draft_and_several_images():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    shapes = served_shapes()
    assert shapes[0] == optimize.COMMON_SHAPE and len(shapes) == len(set(shapes))
    sizes = {(s.width, s.height) for s in shapes}
    assert sizes >= set(ASPECT_RATIO_SIZES.values()) | {scale_size(s, 0.25) for s in ASPECT_RATIO_SIZES.values()}
    assert {Shape(w, h, w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS} <= set(shapes)
    assert Shape(512, 512, 512, 512) in shapes
    assert Shape(1024, 1024, 1024, 1024, ((1024, 1024),)) in shapes  # two images, separate
    assert max(len(s.contexts()) for s in shapes) == 1 + MAX_EXTRA_IMAGES
    assert max(s.tokens()[1] for s in shapes) <= 8400  # docs/editing.md's bound on separate mode's context


def test_warm_up_compiles_once_unless_a_backend_plans_per_shape():
    served = served_shapes()
    assert optimize.warm_up_shapes(AccelerationConfig(), served) == []
    assert optimize.warm_up_shapes(AccelerationConfig.parse("regional"), served) == [optimize.COMMON_SHAPE]
    for spec in ("compile+mode=reduce-overhead", "regional+attention=_native_cudnn"):
        every = optimize.warm_up_shapes(AccelerationConfig.parse(spec), served)
        assert {sum(s.tokens()) for s in every} == {sum(s.tokens()) for s in served}
        assert len(every) == len({sum(s.tokens()) for s in every}) < len(served)


def test_the_default_warm_up_leaves_nothing_to_compile_for_drafts_and_several_images(tiny_dir):
    """One warm-up call at the common shape; then a 0.25 MP draft with three images in separate mode (other
    token counts, three context planes) and a fixed aspect ratio compile nothing. backend "eager": dynamo's
    guards, and so its recompiles, are inductor's."""
    editor = KontextEditor.from_pretrained(tiny_dir, device="cpu")
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    transformer, regional = editor.components.transformer, AccelerationConfig.parse("regional")
    prepared = optimize.optimize(transformer, regional, shapes=served_shapes(), compile_backend="eager")
    compiled = counters["stats"]["unique_graphs"] - before
    assert compiled >= 1 and "warm_up" in prepared
    images = [make_image(96, 64), make_image(64, 96, seed=2), make_image(80, 80, seed=3)]
    draft = dataclasses.replace(
        REQUEST, image=images[0], extra_images=tuple(images[1:]), multi_image_mode="separate", megapixels=0.25
    )
    assert editor.edit(draft).context_tokens > 1024
    editor.edit(dataclasses.replace(REQUEST, aspect_ratio="21:9", megapixels=0.25))
    assert counters["stats"]["unique_graphs"] - before == compiled, "a served shape recompiled"


@pytest.mark.parametrize("regional", [False, True], ids=["whole model", "regional"])
def test_compiled_transformer_serves_new_shapes_without_recompiling(editor, fresh_editor, tmp_path, caplog, regional):
    # backend "eager": dynamo's guards, and so its recompiles, are the same as with inductor, without
    # minutes of C++ builds. The cache directory holds a corrupt artifact under the expected name:
    # setup must log it and compile as usual.
    config = AccelerationConfig(compile=CompileScope.REGIONAL if regional else CompileScope.WHOLE)
    compiled = fresh_editor(None)
    transformer = compiled.components.transformer
    optimize.artifact_path(tmp_path, transformer, config, "eager").write_bytes(b"\x00 not an artifact \xff" * 9)
    warm_shapes = [Shape(64, 48, 64, 48), Shape(96, 64, 64, 64)]
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.WARNING, logger="flux.optimize"):
        optimize.optimize(transformer, config, tmp_path, shapes=warm_shapes, compile_backend="eager")
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
    from flux import optimize
    from tests.test_optimize import SmallModel
    loaded = optimize.load_artifacts(sys.argv[1])
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
    assert optimize.save_artifacts(path) and path.stat().st_size > 0

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
    assert not optimize.load_artifacts(tmp_path / "missing.bin")
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"\x00 not a cache artifact \xff" * 10)
    assert not optimize.load_artifacts(corrupt)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(b"")
    assert not optimize.load_artifacts(truncated)


def test_artifact_name_changes_with_the_config(editor):
    transformer = editor.components.transformer
    whole = AccelerationConfig(compile=CompileScope.WHOLE)
    a = optimize.artifact_path("c", transformer, whole)
    b = optimize.artifact_path("c", transformer, dataclasses.replace(whole, fuse_qkv=True))
    c = optimize.artifact_path("c", transformer, whole, compile_backend="eager")
    same = optimize.artifact_path("c", transformer, dataclasses.replace(whole))
    assert len({a, b, c}) == 3 and a == same


# ---- GPU only ----


@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with compute capability >= 8.9")
def test_fp8_single_blocks_on_gpu(tiny_dir):
    pytest.importorskip("torchao")
    plain = KontextEditor.from_pretrained(tiny_dir, device="cuda")
    fp8 = KontextEditor.from_pretrained(tiny_dir, device="cuda")
    # The tiny model's layers are narrower than FP8_MIN_FEATURES, so lower the bar for this test.
    assert optimize.quantize_fp8(fp8.components.transformer, Fp8Scope.SINGLE, min_features=16) > 0
    a, b = small_edit(fp8).latents, small_edit(plain).latents
    assert ((a - b).norm() / b.norm()).item() < 0.1


def test_fp8_filter_on_the_full_size_transformer():
    from flux.tiny import FULL, build_pipeline

    transformer = build_pipeline(FULL, "meta", torch.bfloat16).transformer
    modules = list(transformer.named_modules())
    single = [name for name, m in modules if optimize.fp8_filter(Fp8Scope.SINGLE)(m, name)]
    every = [name for name, m in modules if optimize.fp8_filter(Fp8Scope.ALL)(m, name)]
    # Per single-stream block: Q, K, V, MLP in, output; per double-stream block: Q, K, V and output for
    # each stream and both MLPs' two layers. Never the norms' modulation or the embedders.
    assert len(single) == 38 * 5
    assert len(every) == 38 * 5 + 19 * 12
    assert not any(".norm" in name for name in every)
    assert all(name.startswith(("transformer_blocks.", "single_transformer_blocks.")) for name in every)
