"""Write a tiny random-initialised FLUX.1 Kontext model in the diffusers layout.

    python -m flux.tiny DIR

The result has the same component classes and directory layout as
black-forest-labs/FLUX.1-Kontext-dev (model_index.json, transformer/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) with tiny dimensions, so the real loader
reads it. Tokenizers are built offline. Everything it produces comes from RANDOM weights: it
exercises the code path and the maths, never image quality.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# The pipeline class is only used to write model_index.json and the component folders in exactly
# the layout (and with exactly the class names) that diffusers writes for the real model.
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"


@dataclass(frozen=True)
class TinyConfig:
    """Dimensions of the tiny model. Real FLUX.1 values are in the comments."""

    seed: int = 0
    num_layers: int = 1  # double-stream blocks (19)
    num_single_layers: int = 1  # single-stream blocks (38)
    num_attention_heads: int = 1  # (24); one head: CPU attention time grows with heads
    attention_head_dim: int = 16  # (128); must equal sum(axes_dims_rope)
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  # (16, 56, 56)
    text_dim: int = 32  # T5 d_model = joint_attention_dim (4096)
    clip_dim: int = 32  # CLIP hidden size = pooled_projection_dim (768)
    vae_width: int = 4  # VAE channels per level (128, 256, 512, 512); on CPU 4 decodes ~10x faster than 8
    vae_mid_attention: bool = False  # (True); attention over 16k latent pixels would dominate CPU time
    vae_levels: int = 4  # four levels -> 8x downsampling, as in the real VAE
    latent_channels: int = 16  # (16)
    # Gain applied to the transformer's embedders after random initialisation. A default
    # initialised tiny transformer barely reacts to the timestep, the guidance value, the text or
    # the context image, so a broken conditioning would go unnoticed in the parity tests. Scaling
    # the embedders up makes the velocity field depend strongly on every one of them.
    conditioning_gain: float = 8.0


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE vocabulary with every byte symbol, so any text (emoji included) encodes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    merges = []
    for a, b in [("t", "h"), ("th", "e</w>"), ("a", "n"), ("r", "e"), ("e", "d</w>")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    """A unigram vocabulary of printable ASCII pieces; anything else maps to <unk>, as in T5."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word in ["▁the", "▁make", "▁red", "▁car", "▁blue", "▁a", "▁image", "▁turn"]:
        pieces.append((word, -3.0))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces.append((ch, -5.0))
        pieces.append(("▁" + ch, -5.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(cfg: TinyConfig = TinyConfig()) -> FluxKontextPipeline:
    """Build the tiny model in memory (float32, eval mode, deterministic for a given seed)."""
    torch.manual_seed(cfg.seed)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.clip_dim,
            intermediate_size=2 * cfg.clip_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=cfg.clip_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=cfg.text_dim,
            d_kv=8,
            d_ff=2 * cfg.text_dim,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * cfg.latent_channels,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.clip_dim,
        guidance_embeds=True,
        axes_dims_rope=cfg.axes_dims_rope,
    )
    with torch.no_grad():
        for module in (transformer.time_text_embed, transformer.context_embedder, transformer.x_embedder):
            for p in module.parameters():
                p.mul_(cfg.conditioning_gain)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * cfg.vae_levels,
        up_block_types=("UpDecoderBlock2D",) * cfg.vae_levels,
        block_out_channels=(cfg.vae_width,) * cfg.vae_levels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=4,
        mid_block_add_attention=cfg.vae_mid_attention,
        sample_size=1024,
        scaling_factor=0.3611,  # the real FLUX VAE's values
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )
    return pipe


def write_tiny_model(directory: str | Path, cfg: TinyConfig = TinyConfig()) -> Path:
    """Write the tiny model to `directory` in the diffusers layout and return the path."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(cfg)
    pipe.save_pretrained(directory, safe_serialization=True)
    # A marker that anything loaded from here comes from random weights (see flux.model).
    (directory / RANDOM_WEIGHTS_MARKER).write_text(
        json.dumps({"what": "tiny random-initialised FLUX.1 Kontext model", "seed": cfg.seed}) + "\n"
    )
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the model (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_tiny_model(args.directory, TinyConfig(seed=args.seed))
    print(f"wrote a tiny RANDOM-weight FLUX.1 Kontext model to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
