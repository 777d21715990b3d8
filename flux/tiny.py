"""Synthetic FLUX.1 Kontext models: the tiny random-weight model, written in the diffusers layout.

    python -m flux.tiny DIR               (--if-missing: keep a complete one already there)
    python -m flux.tiny --lora DIR        a random LoRA for it (DIR/pytorch_lora_weights.safetensors)

The result has the same component classes and directory layout as
black-forest-labs/FLUX.1-Kontext-dev (model_index.json, transformer/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) with tiny dimensions, so the real loader
reads it. Tokenizers are built offline. Everything it produces comes from RANDOM weights: it
exercises the code path and the maths, never image quality.

`build_pipeline` is the one builder of synthetic models: the tiny one (TINY), the full FLUX.1
dimensions with random weights built directly on a GPU (FULL, for real timings), and the base of the
trained proxy the fidelity measurements use.
"""

from __future__ import annotations

import argparse
import contextlib
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
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from flux import safety
from flux.model import RANDOM_WEIGHTS_MARKER


@dataclass(frozen=True)
class SyntheticConfig:
    """Dimensions of a synthetic model. The defaults are the tiny model; FULL has FLUX.1's values."""

    seed: int = 0
    # transformer
    num_layers: int = 1  # double-stream blocks (19)
    num_single_layers: int = 1  # single-stream blocks (38)
    num_attention_heads: int = 1  # (24); one head: CPU attention time grows with heads
    attention_head_dim: int = 16  # (128); must equal sum(axes_dims_rope)
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  # (16, 56, 56)
    # Gain applied to the transformer's embedders after random initialisation. A default
    # initialised tiny transformer barely reacts to the timestep, the guidance value, the text or
    # the context image, so a broken conditioning would go unnoticed in the parity tests. Scaling
    # the embedders up makes the velocity field depend strongly on every one of them.
    conditioning_gain: float = 8.0
    # T5 encoder; its width is the transformer's joint_attention_dim
    text_dim: int = 32  # d_model (4096)
    t5_layers: int = 2  # (24)
    t5_heads: int = 4  # (64)
    t5_head_dim: int = 8  # d_kv (64)
    t5_ff_dim: int = 64  # d_ff (10240)
    t5_vocab: int | None = None  # (32128); None: the offline tokenizer's size
    # CLIP text model; its width is the transformer's pooled_projection_dim
    clip_dim: int = 32  # hidden size (768)
    clip_layers: int = 2  # (12)
    clip_heads: int = 2  # (12)
    clip_ff_dim: int = 64  # intermediate size (3072)
    clip_vocab: int | None = None  # (49408); None: the offline tokenizer's size
    # VAE: four levels -> 8x downsampling, as in the real VAE
    vae_widths: tuple[int, ...] = (4, 4, 4, 4)  # channels per level (128, 256, 512, 512); 4 decodes ~10x faster
    vae_layers_per_block: int = 1  # (2)
    vae_norm_groups: int = 4  # (32)
    vae_mid_attention: bool = False  # (True); attention over 16k latent pixels would dominate CPU time
    latent_channels: int = 16  # (16)


TINY = SyntheticConfig()

FULL = SyntheticConfig(
    # black-forest-labs/FLUX.1-Kontext-dev: transformer/, text_encoder_2/ (T5-XXL), text_encoder/ (CLIP-L), vae/
    num_layers=19,
    num_single_layers=38,
    num_attention_heads=24,
    attention_head_dim=128,
    axes_dims_rope=(16, 56, 56),
    conditioning_gain=1.0,
    text_dim=4096,
    t5_layers=24,
    t5_heads=64,
    t5_head_dim=64,
    t5_ff_dim=10240,
    t5_vocab=32128,
    clip_dim=768,
    clip_layers=12,
    clip_heads=12,
    clip_ff_dim=3072,
    clip_vocab=49408,
    vae_widths=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_norm_groups=32,
    vae_mid_attention=True,
)


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


@contextlib.contextmanager
def _building_on(device: str | torch.device, dtype: torch.dtype):
    """New parameters are created on `device` in `dtype` (12B parameters initialised on the CPU first
    would take minutes; "meta" allocates nothing)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def synthetic_transformer(cfg: SyntheticConfig) -> FluxTransformer2DModel:
    """The transformer of a synthetic model, created on the current default device and dtype (no gain applied)."""
    return FluxTransformer2DModel(
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


def _with_gain(transformer: FluxTransformer2DModel, cfg: SyntheticConfig) -> FluxTransformer2DModel:
    if cfg.conditioning_gain != 1.0:
        with torch.no_grad():
            for module in (transformer.time_text_embed, transformer.context_embedder, transformer.x_embedder):
                for p in module.parameters():
                    p.mul_(cfg.conditioning_gain)
    return transformer


def build_transformer(
    cfg: SyntheticConfig = TINY, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FluxTransformer2DModel:
    """The transformer of a synthetic model alone (eval mode, no gradients), its random weights drawn from
    cfg.seed directly on `device`: the same weights on every device of a kind (what each rank of a benchmark on
    several GPUs builds), not those of build_pipeline(cfg), which draws the text encoders first."""
    with _building_on(device, dtype):
        torch.manual_seed(cfg.seed)
        transformer = _with_gain(synthetic_transformer(cfg), cfg)
    return transformer.eval().requires_grad_(False)


def build_pipeline(
    cfg: SyntheticConfig = TINY, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FluxKontextPipeline:
    """Build a synthetic model in memory (eval mode, deterministic for a given seed), with random
    weights created directly on `device` in `dtype`, and the offline tokenizers."""
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    with _building_on(device, dtype):
        torch.manual_seed(cfg.seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=cfg.clip_vocab or len(tokenizer),
                hidden_size=cfg.clip_dim,
                intermediate_size=cfg.clip_ff_dim,
                num_hidden_layers=cfg.clip_layers,
                num_attention_heads=cfg.clip_heads,
                max_position_embeddings=77,
                projection_dim=cfg.clip_dim,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=cfg.t5_vocab or len(tokenizer_2),
                d_model=cfg.text_dim,
                d_kv=cfg.t5_head_dim,
                d_ff=cfg.t5_ff_dim,
                num_layers=cfg.t5_layers,
                num_heads=cfg.t5_heads,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )
        transformer = _with_gain(synthetic_transformer(cfg), cfg)
        levels = len(cfg.vae_widths)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=cfg.vae_widths,
            layers_per_block=cfg.vae_layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.vae_norm_groups,
            mid_block_add_attention=cfg.vae_mid_attention,
            sample_size=1024,
            scaling_factor=0.3611,  # the real FLUX VAE's values
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    # The real model's scheduler settings: only the time-shift parameters are read.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def write_tiny_safety_checkers(
    directory: str | Path, concept_flags: bool = False, classifier_flags: bool = False
) -> None:
    """Write tiny random safety checkers into a weights directory, in the layout flux.safety reads
    (replacing any there). Their verdicts are set, not learnt, so tests can drive each path:

    concept_flags: the concept checker flags every image (its thresholds are below any cosine
        similarity) instead of none (thresholds above any).
    classifier_flags: the NSFW classifier says "nsfw" for every image instead of "normal" (its
        output layer is zeroed and the bias picks the label).

    The image processors have the real ones' settings (224×224 inputs), so preprocessing costs
    what it does with the real checkers; the networks are one-layer ViTs with 32×32 patches.
    """
    directory = Path(directory)
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=32)
    # Only the vision half of this CLIP config is built; the text half just has to be consistent.
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    with torch.no_grad():
        # flagged when cos(image, concept) - threshold > 0; cosines lie in [-1, 1]
        checker.concept_embeds_weights.fill_(-2.0 if concept_flags else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.eval().save_pretrained(directory / safety.SAFETY_CHECKER)
    CLIPImageProcessorPil().save_pretrained(directory / safety.FEATURE_EXTRACTOR)

    labels = {0: "normal", 1: safety.NSFW_LABEL}
    classifier = ViTForImageClassification(
        ViTConfig(**vision, image_size=224, id2label=labels, label2id={v: k for k, v in labels.items()})
    )
    with torch.no_grad():
        classifier.classifier.weight.zero_()
        classifier.classifier.bias.copy_(torch.tensor([-4.0, 4.0] if classifier_flags else [4.0, -4.0]))
    classifier.eval().save_pretrained(directory / safety.NSFW_CLASSIFIER)
    ViTImageProcessorPil().save_pretrained(directory / safety.NSFW_CLASSIFIER)


def write_tiny_model(directory: str | Path, cfg: SyntheticConfig = TINY) -> Path:
    """Write the tiny model to `directory` in the diffusers layout, with tiny safety checkers that
    flag nothing (write_tiny_safety_checkers), and return the path."""
    directory = Path(directory)
    pipe = build_pipeline(cfg)
    pipe.save_pretrained(directory, safe_serialization=True)
    write_tiny_safety_checkers(directory)
    # A marker that anything loaded from here comes from random weights (see flux.model).
    (directory / RANDOM_WEIGHTS_MARKER).write_text(
        json.dumps({"what": "tiny random-initialised FLUX.1 Kontext model", "seed": cfg.seed}) + "\n"
    )
    return directory


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]


def write_tiny_lora(
    directory: str | Path,
    seed: int = 1,
    rank: int = 4,
    alpha: float = 8.0,
    prefixed: bool = True,
    cfg: SyntheticConfig = TINY,
    bias: bool = False,
) -> Path:
    """A random LoRA (for tests and local tries: it changes the edit, it is not a trained one) for the tiny
    model's transformer (or the synthetic model `cfg`), saved as diffusers saves one:
    `transformer.`-prefixed keys (FluxKontextPipeline.save_lora_weights), or unprefixed with its peft config
    (save_lora_adapter). With `bias`, each lora_B has a bias too (peft's lora_bias), which a merge adds to the
    layer's own bias."""
    import warnings

    from peft import LoraConfig

    transformer = build_pipeline(cfg).transformer
    directory = Path(directory)
    # peft takes lora_bias only with its default initialisation (lora_A: Kaiming-uniform)
    init = True if bias else "gaussian"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=init, lora_bias=bias)
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


def tiny_model(directory: str | Path, cfg: SyntheticConfig = TINY) -> Path:
    """The tiny model in `directory`: written there (write_tiny_model) unless a complete one is there already."""
    directory = Path(directory)
    needed = ("model_index.json", RANDOM_WEIGHTS_MARKER, *safety.CHECKER_FOLDERS)
    if all((directory / name).exists() for name in needed):
        return directory
    return write_tiny_model(directory, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the model (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if-missing", action="store_true", help="keep a complete tiny model already there")
    parser.add_argument("--lora", action="store_true", help="write a random LoRA for the tiny model instead")
    args = parser.parse_args(argv)
    if args.lora:
        path = write_tiny_lora(args.directory, seed=args.seed)
        print(f"wrote a random LoRA for the tiny model to {path}", file=sys.stderr)
        return 0
    write = tiny_model if args.if_missing else write_tiny_model
    out = write(args.directory, SyntheticConfig(seed=args.seed))
    print(f"wrote a tiny RANDOM-weight FLUX.1 Kontext model to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
