"""LoRA files for the tiny model, made in the tests with peft (no download)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig

from flux.tiny import TINY, SyntheticConfig, build_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]


def write_tiny_lora(
    directory: Path,
    seed: int = 1,
    rank: int = 4,
    alpha: float = 8.0,
    prefixed: bool = True,
    cfg: SyntheticConfig = TINY,
    bias: bool = False,
) -> Path:
    """A random LoRA for flux.tiny's transformer (or the synthetic model `cfg`), saved as diffusers saves one:
    `transformer.`-prefixed keys (FluxKontextPipeline.save_lora_weights), or unprefixed with its peft config
    (save_lora_adapter). With `bias`, each lora_B has a bias too (peft's lora_bias), which a merge adds to the
    layer's own bias."""
    transformer = build_pipeline(cfg).transformer
    # peft takes lora_bias only with its default initialisation (lora_A: Kaiming-uniform)
    init = True if bias else "gaussian"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=init, lora_bias=bias)
    transformer.add_adapter(config, adapter_name="tiny")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:  # peft starts B (and its bias) at zero: the LoRA would change nothing
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    if prefixed:
        from diffusers import FluxKontextPipeline
        from peft.utils import get_peft_model_state_dict

        with warnings.catch_warnings():
            # peft takes any 1-D LoRA tensor for an ungathered shard; the lora_B biases are 1-D by design
            warnings.filterwarnings("ignore", message=".*LoRA tensor.*invalid shape.*lora_B.bias")
            layers = get_peft_model_state_dict(transformer, adapter_name="tiny")
        metadata = transformer.peft_config["tiny"].to_dict()  # the rank and alpha, as diffusers writes them
        FluxKontextPipeline.save_lora_weights(
            directory, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )
    else:
        transformer.save_lora_adapter(directory, adapter_name="tiny")
    return directory / "pytorch_lora_weights.safetensors"
