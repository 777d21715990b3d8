"""LoRA files for the tiny model, made in the tests with peft (no download)."""

from __future__ import annotations

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
) -> Path:
    """A random LoRA for flux.tiny's transformer (or the synthetic model `cfg`), saved as diffusers saves one:
    `transformer.`-prefixed keys (FluxKontextPipeline.save_lora_weights), or unprefixed with its peft config
    (save_lora_adapter)."""
    transformer = build_pipeline(cfg).transformer
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="gaussian")
    transformer.add_adapter(config, adapter_name="tiny")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the LoRA would change nothing
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    if prefixed:
        from diffusers import FluxKontextPipeline
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(transformer, adapter_name="tiny")
        metadata = transformer.peft_config["tiny"].to_dict()  # the rank and alpha, as diffusers writes them
        FluxKontextPipeline.save_lora_weights(
            directory, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )
    else:
        transformer.save_lora_adapter(directory, adapter_name="tiny")
    return directory / "pytorch_lora_weights.safetensors"
