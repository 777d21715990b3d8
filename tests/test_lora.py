"""LoRA for one request: it changes the edit, its scale is the file's alpha/rank times the strength, and
afterwards the transformer is bit for bit what it was, also when compiled (without a recompile)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from flux import optimize
from flux.errors import InvalidInputError
from flux.lora import LoraRequest, LoraSlot, keeps_on_gpu
from flux.optimize import AccelerationConfig, CompileScope
from flux.pipeline import EditRequest, KontextEditor
from tests.conftest import make_image
from tests.lora_files import write_tiny_lora

REQUEST = EditRequest("make the car red", make_image(64, 48), num_inference_steps=4, seed=1, acceleration="none")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("lora"))


@pytest.fixture
def fresh_editor(tiny_dir):
    return KontextEditor.from_pretrained(tiny_dir, device="cpu")


def edit(editor, lora=None, **kw):
    import dataclasses

    return editor.edit(dataclasses.replace(REQUEST, lora=lora, **kw))


def test_a_lora_changes_the_edit_and_leaves_nothing_behind(fresh_editor, lora_file):
    transformer = fresh_editor.components.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in transformer.named_modules()]
    plain = edit(fresh_editor)
    with_lora = edit(fresh_editor, LoraRequest(lora_file, 1.0))
    after = edit(fresh_editor)
    change = ((with_lora.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert change > 0.05
    assert {"lora_load", "lora_unload"} <= set(with_lora.seconds)
    assert torch.equal(after.latents, plain.latents)
    assert after.image.tobytes() == plain.image.tobytes()
    state = transformer.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert [(n, type(m)) for n, m in transformer.named_modules()] == modules_before
    assert not hasattr(transformer, "peft_config") and "lora_scale" not in transformer.__dict__


@pytest.mark.parametrize("prefixed", [True, False], ids=["pipeline format", "adapter format"])
def test_the_fused_change_is_strength_times_alpha_over_rank_times_b_a(fresh_editor, tmp_path, prefixed):
    path = write_tiny_lora(tmp_path, rank=4, alpha=2.0, prefixed=prefixed)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    name = "single_transformer_blocks.0.proj_mlp"
    layer = dict(fresh_editor.components.transformer.named_modules())[name]
    original = layer.weight.detach().clone()
    with fresh_editor.lora.applied(LoraRequest(path, 0.5)):
        delta = layer.weight.detach() - original
    expected = 0.5 * (2.0 / 4) * tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.weight, original)


def test_strength_zero_is_the_plain_edit(fresh_editor, lora_file):
    assert torch.equal(edit(fresh_editor, LoraRequest(lora_file, 0.0)).latents, edit(fresh_editor).latents)


def test_files_that_are_not_a_lora_for_this_model_are_named(fresh_editor, lora_file, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    wrong_shape = tmp_path / "wrong.safetensors"
    tensors = load_file(lora_file)
    key = next(k for k in tensors if k.endswith("proj_mlp.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 7)
    save_file(tensors, wrong_shape)
    stray = tmp_path / "stray.safetensors"
    save_file(
        {
            "transformer.no_such_block.lora_A.weight": torch.zeros(4, 16),
            "transformer.no_such_block.lora_B.weight": torch.zeros(16, 4),
        },
        stray,
    )
    for path, says in [(garbage, "not a readable"), (wrong_shape, "does not fit"), (stray, "does not fit")]:
        with pytest.raises(InvalidInputError, match=says) as e:
            edit(fresh_editor, LoraRequest(path, 1.0))
        assert e.value.name == "lora_weights"
    # a refused LoRA changed nothing
    assert torch.equal(edit(fresh_editor).latents, edit(KontextEditor(fresh_editor.components)).latents)


def test_a_lora_is_refused_on_fused_qkv_projections(tiny_dir, lora_file):
    fused = KontextEditor.from_pretrained(tiny_dir, device="cpu", accelerations=AccelerationConfig(fuse_qkv=True))
    with pytest.raises(InvalidInputError, match="fuses the QKV"):
        edit(fused, LoraRequest(lora_file, 1.0))


def test_a_compiled_transformer_runs_a_lora_without_recompiling(fresh_editor, lora_file):
    eager = edit(fresh_editor, LoraRequest(lora_file, 1.0)).latents
    torch._dynamo.reset()
    optimize.optimize(
        fresh_editor.components.transformer,
        AccelerationConfig(compile=CompileScope.REGIONAL),
        shapes=[optimize.Shape(64, 48, 64, 48)],
        compile_backend="eager",
    )
    plain = edit(fresh_editor).latents
    graphs = counters["stats"]["unique_graphs"]
    with_lora = edit(fresh_editor, LoraRequest(lora_file, 1.0)).latents
    again = edit(fresh_editor).latents
    assert counters["stats"]["unique_graphs"] == graphs, "the LoRA request recompiled"
    torch.testing.assert_close(with_lora, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, plain)


def test_originals_stay_on_the_gpu_only_with_room_to_spare():
    gib = 2**30
    assert keeps_on_gpu(1 * gib, free_bytes=20 * gib, headroom=16 * gib)
    assert not keeps_on_gpu(5 * gib, free_bytes=20 * gib, headroom=16 * gib)
    assert not keeps_on_gpu(1 * gib, free_bytes=10 * gib)  # the default headroom: 16 GiB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("headroom,where", [(0, "gpu"), (2**60, "pinned")])
def test_originals_on_the_gpu_or_in_pinned_memory_restore_bit_for_bit(tiny_dir, lora_file, headroom, where):
    editor = KontextEditor.from_pretrained(tiny_dir, device="cuda")
    editor.lora = LoraSlot(editor.components.transformer, gpu_headroom=headroom)
    plain = edit(editor)
    assert not torch.equal(edit(editor, LoraRequest(lora_file, 1.0)).latents, plain.latents)
    assert torch.equal(edit(editor).latents, plain.latents)
    kept = list(editor.lora._originals.values())
    assert kept and all(t.is_cuda if where == "gpu" else t.is_pinned() for t in kept)
