import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux.errors import WeightsError
from flux.model import load_components
from flux.weights import resolve_weights_dir


@pytest.fixture
def broken_copy(tiny_dir, tmp_path):
    copy = tmp_path / "weights"
    shutil.copytree(tiny_dir, copy)
    return copy


def rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_loads_the_tiny_model_and_flags_it_as_random(tiny_dir):
    c = load_components(tiny_dir)
    assert c.random_weights
    assert not c.transformer.training and not c.text_encoder_2.training


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_components(tmp_path / "nope")


@pytest.mark.parametrize("entry", ["vae", "tokenizer_2", "model_index.json", "scheduler"])
def test_missing_component_is_named(broken_copy, entry):
    target = broken_copy / entry
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightsError, match=f"missing: {entry}"):
        load_components(broken_copy)


def test_missing_weights_file_is_named(broken_copy):
    (broken_copy / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="transformer/"):
        load_components(broken_copy)


@pytest.mark.parametrize(
    "subfolder,file,key",
    [
        ("transformer", "diffusion_pytorch_model.safetensors", "norm_out.linear.weight"),
        ("vae", "diffusion_pytorch_model.safetensors", "decoder.conv_out.weight"),
        ("text_encoder_2", "model.safetensors", "encoder.block.0.layer.0.SelfAttention.q.weight"),
        ("text_encoder", "model.safetensors", "final_layer_norm.weight"),
    ],
)
def test_missing_tensor_is_named(broken_copy, subfolder, file, key):
    rewrite(broken_copy / subfolder / file, lambda t: t.pop(key))
    with pytest.raises(WeightsError, match=rf"{subfolder}/ .*missing keys: {key}"):
        load_components(broken_copy)


def test_unexpected_tensor_is_named(broken_copy):
    rewrite(
        broken_copy / "transformer" / "diffusion_pytorch_model.safetensors",
        lambda t: t.update({"stray.weight": torch.zeros(2)}),
    )
    with pytest.raises(WeightsError, match="unexpected keys: stray.weight"):
        load_components(broken_copy)


def test_wrong_shape_is_named(broken_copy):
    key = "proj_out.bias"
    rewrite(
        broken_copy / "transformer" / "diffusion_pytorch_model.safetensors", lambda t: t.update({key: torch.zeros(3)})
    )
    with pytest.raises(WeightsError, match=r"transformer/"):
        load_components(broken_copy)


def test_weights_dir_from_environment(tiny_dir, monkeypatch):
    monkeypatch.setenv("FLUX_WEIGHTS", str(tiny_dir))
    assert resolve_weights_dir() == tiny_dir


def test_absent_weights_without_token_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_WEIGHTS", str(tmp_path / "absent"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(WeightsError, match="HF_TOKEN"):
        resolve_weights_dir()
    assert not (tmp_path / "absent").exists()


def test_wrong_shape_in_a_text_encoder_is_named(broken_copy):
    rewrite(
        broken_copy / "text_encoder" / "model.safetensors",
        lambda t: t.update({"final_layer_norm.weight": torch.zeros(5)}),
    )
    with pytest.raises(
        WeightsError, match=r"text_encoder/ .*mismatched keys: final_layer_norm.weight \(\[5\] in the file"
    ):
        load_components(broken_copy)
