"""LoRAs for a request: each changes the edit by its alpha/rank times its strength, several add up, they stay fused
while the next requests ask for the same ones (nothing fused again), and when a request asks for others or none
the transformer is bit for bit what it was, also when compiled (without a recompile)."""

import dataclasses
import hashlib

import pytest
import torch
from cog import CancelationException
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from flux import lora as lora_module
from flux import optimize
from flux.errors import InvalidInputError
from flux.lora import LoraRequest, LoraSlot, keeps_on_gpu
from flux.optimize import AccelerationConfig, CompileScope
from flux.pipeline import EditRequest, KontextEditor
from flux.tiny import TINY, write_tiny_lora
from measure import lora as lora_measure
from tests.conftest import make_image

REQUEST = EditRequest("make the car red", make_image(64, 48), num_inference_steps=4, seed=1, acceleration="none")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("lora"))


@pytest.fixture
def fresh_editor(tiny_dir):
    return KontextEditor.from_pretrained(tiny_dir, device="cpu")


def edit(editor, *loras, **kw):
    return editor.edit(dataclasses.replace(REQUEST, loras=loras, **kw))


def test_a_lora_changes_the_edit_and_leaves_nothing_behind(fresh_editor, lora_file):
    transformer = fresh_editor.components.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in transformer.named_modules()]
    plain = edit(fresh_editor)
    with_lora = edit(fresh_editor, LoraRequest(lora_file, 1.0))
    after = edit(fresh_editor)
    change = ((with_lora.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert change > 0.05
    assert "lora_load" in with_lora.seconds and "lora_unload" in after.seconds  # taken out by the next request
    assert torch.equal(after.latents, plain.latents)
    assert after.image.tobytes() == plain.image.tobytes()
    state = transformer.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert [(n, type(m)) for n, m in transformer.named_modules()] == modules_before
    assert not hasattr(transformer, "peft_config") and "lora_scale" not in transformer.__dict__


def test_a_lora_with_biases_is_taken_out_bit_for_bit(fresh_editor, tmp_path):
    """peft merges a LoRA's lora_B biases into the layers' own biases: those come back too, and fusing the same
    file again starts from the original biases, not from the last fuse's."""
    path = write_tiny_lora(tmp_path, bias=True)
    assert any(k.endswith("lora_B.bias") for k in load_file(path))
    transformer = fresh_editor.components.transformer
    original = {k: v.clone() for k, v in transformer.state_dict().items()}
    fused_states = []
    for _ in range(2):  # A, none, A, none
        fresh_editor.lora.use([LoraRequest(path, 1.0)])
        fused_states.append({k: v.clone() for k, v in transformer.state_dict().items()})
        fresh_editor.lora.use([])
        state = transformer.state_dict()
        assert state.keys() == original.keys()
        assert [k for k in original if not torch.equal(state[k], original[k])] == []
    changed = [k for k in original if not torch.equal(fused_states[0][k], original[k])]
    assert any(k.endswith("proj_out.bias") for k in changed) and any(k.endswith(".weight") for k in changed)
    assert all(torch.equal(fused_states[0][k], fused_states[1][k]) for k in original)


@pytest.mark.parametrize("prefixed", [True, False], ids=["pipeline format", "adapter format"])
def test_the_fused_change_is_strength_times_alpha_over_rank_times_b_a(fresh_editor, tmp_path, prefixed):
    path = write_tiny_lora(tmp_path, rank=4, alpha=2.0, prefixed=prefixed)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    name = "single_transformer_blocks.0.proj_mlp"
    layer = dict(fresh_editor.components.transformer.named_modules())[name]
    original = layer.weight.detach().clone()
    fresh_editor.lora.use([LoraRequest(path, 0.5)])
    delta = layer.weight.detach() - original
    fresh_editor.lora.restore()
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


# ---- several LoRAs, kept warm ----------------------------------------------------------------------------------


def draft(editor, *loras):
    return edit(editor, *loras, megapixels=0.25)


@pytest.fixture(scope="module")
def second_lora(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("second"), seed=2, rank=2, alpha=2.0)


def test_several_loras_add_up_each_at_its_strength(fresh_editor, lora_file, second_lora):
    layer_name = "single_transformer_blocks.0.proj_mlp"
    layer = dict(fresh_editor.components.transformer.named_modules())[layer_name]
    original = layer.weight.detach().clone()

    def delta(path, strength, alpha, rank):
        tensors = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
        b, a = tensors[f"{layer_name}.lora_B.weight"], tensors[f"{layer_name}.lora_A.weight"]
        return strength * (alpha / rank) * b @ a

    fresh_editor.lora.use([LoraRequest(lora_file, 0.5), LoraRequest(second_lora, -1.0)])
    expected = delta(lora_file, 0.5, 8.0, 4) + delta(second_lora, -1.0, 2.0, 2)
    torch.testing.assert_close(layer.weight.detach() - original, expected, rtol=1e-4, atol=1e-5)
    fresh_editor.lora.restore()
    assert torch.equal(layer.weight, original)


def count_calls(monkeypatch, slot) -> dict[str, int]:
    calls = {"fuse": 0, "restore": 0}
    for name in calls:
        real = getattr(slot, f"_{name}")

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(slot, f"_{name}", counted)
    return calls


def test_the_same_loras_stay_fused_and_give_the_same_edit(fresh_editor, lora_file, second_lora, monkeypatch):
    calls = count_calls(monkeypatch, fresh_editor.lora)
    both = (LoraRequest(lora_file, 1.0), LoraRequest(second_lora, 0.5))
    cold = draft(fresh_editor, *both)
    assert cold.lora_reused is False and calls == {"fuse": 2, "restore": 0}
    assert {"lora_load"} == {k for k in cold.seconds if k.startswith("lora")}
    warm = draft(fresh_editor, *both)
    assert warm.lora_reused is True and calls == {"fuse": 2, "restore": 0}  # nothing unfused or fused again
    assert not any(k.startswith("lora") for k in warm.seconds)
    assert torch.equal(warm.latents, cold.latents) and warm.image.tobytes() == cold.image.tobytes()
    # Another strength, another order, or none: restored first, then fused as asked.
    for loras, fused in [(both[:1], 3), ((both[1], both[0]), 5), ((), 5)]:
        use = fresh_editor.lora.use(loras)
        assert use.reused is False and calls["fuse"] == fused and "lora_unload" in use.seconds
    assert calls["restore"] == 3


def test_the_same_lora_is_known_by_its_bytes(fresh_editor, lora_file, tmp_path):
    """A path rewritten in place with other bytes of the same size (the same inode: a number that also comes back
    after an unlink) holds another LoRA; the same bytes under another name, or the digest the server's cache
    hands over with a file, are the same LoRA."""
    other = write_tiny_lora(tmp_path / "other", seed=5)
    assert other.stat().st_size == lora_file.stat().st_size and other.read_bytes() != lora_file.read_bytes()
    slot, transformer = fresh_editor.lora, fresh_editor.components.transformer
    path = tmp_path / "lora.safetensors"
    path.write_bytes(lora_file.read_bytes())
    assert [slot.use([LoraRequest(path, 1.0)]).reused for _ in range(2)] == [False, True]
    inode = path.stat().st_ino
    with open(path, "r+b") as f:
        f.write(other.read_bytes())
    assert path.stat().st_ino == inode
    assert slot.use([LoraRequest(path, 1.0)]).reused is False
    rewritten = weights(transformer)
    assert slot.use([LoraRequest(other, 1.0)]).reused is True
    slot.use([])
    assert slot.use([LoraRequest(other, 1.0)]).reused is False
    assert same(weights(transformer), rewritten)  # what the rewritten path fused was the new LoRA
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    assert slot.use([LoraRequest(path, 1.0, sha256=digest)]).reused is True
    slot.restore()


def test_a_bad_second_lora_is_named_and_changes_nothing(fresh_editor, lora_file, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a LoRA")
    slot = fresh_editor.lora
    slot.use([LoraRequest(lora_file, 1.0)])
    state = {k: v.clone() for k, v in fresh_editor.components.transformer.state_dict().items()}
    with pytest.raises(InvalidInputError, match="^lora_weights item 2 is not a readable .safetensors file"):
        slot.use([LoraRequest(lora_file, 1.0), LoraRequest(garbage, 1.0)])
    after = fresh_editor.components.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # the warm LoRA still in place, untouched
    assert slot.use([LoraRequest(lora_file, 1.0)]).reused is True
    slot.restore()


def test_a_failure_while_fusing_leaves_the_original_weights(fresh_editor, lora_file, second_lora, monkeypatch):
    original = {k: v.clone() for k, v in fresh_editor.components.transformer.state_dict().items()}
    real, fused = fresh_editor.lora._fuse, []

    def fuse_then_fail(*args, **kwargs):
        if fused:
            raise RuntimeError("out of memory")
        fused.append(real(*args, **kwargs))

    monkeypatch.setattr(fresh_editor.lora, "_fuse", fuse_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        fresh_editor.lora.use([LoraRequest(lora_file, 1.0), LoraRequest(second_lora, 1.0)])
    state = fresh_editor.components.transformer.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    monkeypatch.undo()
    assert fresh_editor.lora.use([LoraRequest(lora_file, 1.0)]).reused is False  # nothing counted as fused


def weights(transformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in transformer.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cancel_restores_after(monkeypatch, copies: int) -> None:
    """From now on a restore is canceled as Cog cancels a prediction (CancelationException raised in the predict
    thread, wherever it is) after it has copied `copies` tensors back."""
    real = lora_module._merged_parameters

    def copied_then_canceled(transformer, targets):
        for i, item in enumerate(real(transformer, targets)):
            if i == copies:
                raise CancelationException("canceled")
            yield item

    monkeypatch.setattr(lora_module, "_merged_parameters", copied_then_canceled)


def test_a_restore_canceled_part_way_is_done_again_in_full(fresh_editor, lora_file, monkeypatch):
    slot, transformer = fresh_editor.lora, fresh_editor.components.transformer
    original = weights(transformer)
    slot.use([LoraRequest(lora_file, 1.0)])
    fused = weights(transformer)
    cancel_restores_after(monkeypatch, 5)
    with pytest.raises(CancelationException):
        slot.use([])
    monkeypatch.undo()
    mixed = weights(transformer)
    assert not same(mixed, original) and not same(mixed, fused)  # canceled part way
    again = slot.use([LoraRequest(lora_file, 1.0)])
    assert again.reused is False and "lora_unload" in again.seconds  # not the LoRA fused: all restored, fused anew
    assert same(weights(transformer), fused)
    cancel_restores_after(monkeypatch, 3)
    with pytest.raises(CancelationException):
        slot.restore()
    monkeypatch.undo()
    slot.use([])
    assert same(weights(transformer), original)


def test_a_fuse_canceled_with_its_clean_up_is_undone_by_the_next_use(fresh_editor, lora_file, second_lora, monkeypatch):
    """A cancel while the second LoRA fuses, and another while the first is taken out again."""
    slot, transformer = fresh_editor.lora, fresh_editor.components.transformer
    original = weights(transformer)
    real, fused = slot._fuse, []

    def fuse_then_cancel(*args, **kwargs):
        if fused:
            cancel_restores_after(monkeypatch, 4)
            raise CancelationException("canceled")
        fused.append(real(*args, **kwargs))

    monkeypatch.setattr(slot, "_fuse", fuse_then_cancel)
    with pytest.raises(CancelationException):
        slot.use([LoraRequest(lora_file, 1.0), LoraRequest(second_lora, 1.0)])
    monkeypatch.undo()
    assert not same(weights(transformer), original)
    slot.use([])
    assert same(weights(transformer), original)


@pytest.mark.parametrize(
    "strengths,says",
    [
        ([1.0] * 4, "^lora_weights holds at most 3 LoRAs, got 4"),
        ([1.0, 3.5], "^lora_strength item 2 must be between -1.0 and 3.0, got 3.5"),
        ([float("nan")], "^lora_strength must be a number, got nan"),
        ([1.0, True], "^lora_strength item 2 must be a number, got True"),
    ],
)
def test_too_many_loras_and_bad_strengths_are_named(editor, lora_file, strengths, says):
    with pytest.raises(InvalidInputError, match=says):
        draft(editor, *(LoraRequest(lora_file, s) for s in strengths))


def test_the_measuring_tool_times_cold_and_warm_requests():
    row = lora_measure.measure(TINY, rank=4, count=2, repeats=1)
    assert row["cold s"] > 0 and row["warm s"] > 0 and row["cold / warm"] == row["cold s"] / row["warm s"]
