"""A small trained stand-in for FLUX.1 Kontext: real (learned, smooth) trajectories on CPU.

    python -m measure.proxy OUTDIR

Random-weight transformers are no use for measuring step caching: their output oscillates with the
timestep, so every extrapolation looks bad. This module trains a small model with the real classes
(diffusers' FluxTransformer2DModel and AutoencoderKL, the tiny text encoders of flux.tiny's builder) on a
synthetic editing task generated in code, and writes it in the diffusers layout that the strict
loader reads:

- the task: a context image with a square and a circle on a flat background, an instruction
  "make the square red" (or the circle; red, green, blue or yellow), and the target image with
  that shape recoloured;
- phase 1 trains the VAE as an autoencoder (so decoding roughly inverts encoding, and PSNR/SSIM of
  decoded images mean something), then sets its shift/scale to the latents' mean and 1/std;
- phase 2 trains the transformer by rectified flow on the VAE's latents: x_t = (1 - t)·x0 + t·ε,
  target velocity ε - x0, t drawn logit-normal and time-shifted like the sampling schedule,
  guidance embedding fed the default 2.5. Text encoders stay random and frozen.

The result is not pretty and not a real editor; it has learned velocity fields, which is what the
fidelity harness (measure.fidelity) needs. Everything is seeded: the same command gives the same
weights on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flux import sampling
from flux.model import RANDOM_WEIGHTS_MARKER, FluxComponents
from flux.pipeline import KontextEditor
from flux.tiny import SyntheticConfig, build_pipeline

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
}
SHAPES = ("square", "circle")
PROMPTS = [f"make the {shape} {color}" for shape in SHAPES for color in COLORS]
GUIDANCE = sampling.DEFAULT_GUIDANCE  # the proxy is trained at this value only


@dataclass(frozen=True)
class ProxyConfig:
    """How the proxy is built and trained. Defaults are the shipped model (tests/assets/proxy)."""

    seed: int = 0
    image_size: int = 64  # pixels; 8×8 latents, 16 packed tokens for the noise and 16 for the context
    # The transformer: 2 double- and 2 single-stream blocks, 2 heads × 32; a VAE of 4 levels of 8 channels
    # with mid-block attention; text encoders as the tiny model's. No embedder gain: it is trained, so the
    # default initialisation is the right start.
    model: SyntheticConfig = SyntheticConfig(
        num_layers=2,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=32,
        axes_dims_rope=(8, 12, 12),
        vae_widths=(8, 8, 8, 8),
        vae_mid_attention=True,
    )
    vae_steps: int = 500  # phase 1: autoencoder iterations
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6  # keeps the posterior from collapsing to a point, barely
    flow_steps: int = 2500  # phase 2: rectified-flow iterations
    flow_lr: float = 1e-3
    batch_size: int = 16
    text_tokens: int = 32  # T5 sequence length (512 in the real model)
    pool_size: int = 2048  # edit examples encoded once after phase 1, sampled for phase 2

    def model_config(self) -> SyntheticConfig:
        return dataclasses.replace(self.model, seed=self.seed, conditioning_gain=1.0)


@dataclass(frozen=True)
class EditExample:
    context: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    target: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    prompt_index: torch.Tensor  # (B,) index into PROMPTS


def make_examples(generator: torch.Generator, n: int, size: int) -> EditExample:
    """n random edit examples: background, a square and a circle; the prompt recolours one of them."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    palette = torch.tensor(list(COLORS.values()))
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    background = (0.3 + 0.5 * rand(n, 3, 1, 1)).expand(n, 3, size, size)
    # square: side 1/4..1/2 of the image; circle: radius 1/8..3/16
    side = size * (0.25 + 0.25 * rand(n, 1, 1))
    sx, sy = (size - side) * rand(n, 1, 1), (size - side) * rand(n, 1, 1)
    square = ((xx >= sx) & (xx < sx + side) & (yy >= sy) & (yy < sy + side)).unsqueeze(1)
    radius = size * (0.125 + 0.0625 * rand(n, 1, 1))
    cx, cy = radius + (size - 2 * radius) * rand(n, 1, 1), radius + (size - 2 * radius) * rand(n, 1, 1)
    circle = ((xx - cx) ** 2 + (yy - cy) ** 2 < radius**2).unsqueeze(1)
    square_color, circle_color = rand(n, 3, 1, 1), rand(n, 3, 1, 1)

    prompt_index = torch.randint(len(PROMPTS), (n,), generator=generator)
    shape_is_circle = (prompt_index // len(COLORS)).bool().view(n, 1, 1, 1)
    new_color = palette[prompt_index % len(COLORS)].view(n, 3, 1, 1)

    def draw(sq_color: torch.Tensor, ci_color: torch.Tensor) -> torch.Tensor:
        img = torch.where(square, sq_color, background)
        return torch.where(circle, ci_color, img) * 2 - 1  # the circle is drawn over the square

    context = draw(square_color, circle_color)
    target = draw(
        torch.where(shape_is_circle, square_color, new_color), torch.where(shape_is_circle, new_color, circle_color)
    )
    return EditExample(context, target, prompt_index)


def _logit_normal_times(generator: torch.Generator, n: int, image_seq_len: int, schedule) -> torch.Tensor:
    """Training times like the sampler's: a logit-normal draw, time-shifted for the token count."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return sampling.time_shift(schedule.mu(image_seq_len), u)


def _train_vae(editor: KontextEditor, cfg: ProxyConfig, generator: torch.Generator, log) -> None:
    vae = editor.components.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    for it in range(cfg.vae_steps):
        ex = make_examples(generator, cfg.batch_size // 2, cfg.image_size)
        x = torch.cat([ex.context, ex.target])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 250 == 0 or it == cfg.vae_steps - 1:
            psnr = 10 * math.log10(4 / torch.nn.functional.mse_loss(recon, x).item())
            log(f"vae {it:5d}  loss {loss.item():.5f}  recon PSNR {psnr:.1f} dB")
    vae.eval().requires_grad_(False)
    # Shift and scale so the latents the transformer sees are centred with unit variance.
    with torch.no_grad():
        ex = make_examples(generator, 256, cfg.image_size)
        z = vae.encode(torch.cat([ex.context, ex.target])).latent_dist.mode()
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())


def _train_flow(editor: KontextEditor, cfg: ProxyConfig, generator: torch.Generator, log) -> None:
    c = editor.components
    latent = cfg.image_size // 8
    # Frozen text encoders: one embedding per prompt, computed once (cloned out of inference mode).
    embeds = [editor.encode_prompt(p) for p in PROMPTS]
    txt_all = torch.cat([t for t, _ in embeds]).clone()  # (P, 512, D)
    vec_all = torch.cat([v for _, v in embeds]).clone()  # (P, D')
    # A pool of encoded examples: packed context and target latents.
    ex = make_examples(generator, cfg.pool_size, cfg.image_size)
    with torch.no_grad():
        ctx_pool = torch.cat([sampling.pack(editor.encode_image(x)) for x in ex.context.split(256)]).clone()
        tgt_pool = torch.cat([sampling.pack(editor.encode_image(x)) for x in ex.target.split(256)]).clone()
    prompt_pool = ex.prompt_index
    n_tokens = ctx_pool.shape[1]
    img_ids = torch.cat([sampling.position_ids(latent, latent, 0), sampling.position_ids(latent, latent, 1)])
    txt_ids = torch.zeros(txt_all.shape[1], 3)
    latent_size = dict(latent_height=latent, latent_width=latent)

    transformer = c.transformer
    transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.flow_lr, weight_decay=0.0)
    warmup = max(1, cfg.flow_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.flow_steps) / cfg.flow_steps)),
    )
    b = cfg.batch_size
    for it in range(cfg.flow_steps):
        idx = torch.randint(cfg.pool_size, (b,), generator=generator)
        x0, ctx, p = tgt_pool[idx], ctx_pool[idx], prompt_pool[idx]
        eps = torch.randn(x0.shape, generator=generator)
        t = _logit_normal_times(generator, b, n_tokens, editor.schedule)
        x_t = (1 - t.view(b, 1, 1)) * x0 + t.view(b, 1, 1) * eps
        inputs = sampling.KontextInputs(eps, ctx, img_ids, txt_all[p], txt_ids, vec_all[p], **latent_size)
        pred = transformer(**sampling.transformer_kwargs(inputs, x_t, t, GUIDANCE))[0][:, :n_tokens]
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        if it % 250 == 0 or it == cfg.flow_steps - 1:
            log(f"flow {it:5d}  loss {loss.item():.4f}")
    transformer.eval().requires_grad_(False)


def train_proxy(cfg: ProxyConfig = ProxyConfig(), log=print):
    """Build and train the proxy in memory; returns the diffusers FluxKontextPipeline holding it."""
    pipe = build_pipeline(cfg.model_config())
    # The prompts are at most 15 T5 tokens: 32 instead of 512 makes training ten times cheaper.
    pipe.tokenizer_2.model_max_length = cfg.text_tokens
    components = FluxComponents.from_pipeline(pipe, random_weights=False)
    for m in (pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    editor = KontextEditor(components)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # One thread: the same weights whatever the core count (reductions split differently across
    # threads), and on a shared 2-core machine it was faster than two contended threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_vae(editor, cfg, generator, log)
        _train_flow(editor, cfg, generator, log)
    finally:
        torch.set_num_threads(threads)
    return pipe


def write_proxy(directory: str | Path, cfg: ProxyConfig = ProxyConfig(), log=print) -> Path:
    """Train the proxy and write it to `directory` in the diffusers layout."""
    directory = Path(directory)
    t0 = time.perf_counter()
    pipe = train_proxy(cfg, log)
    seconds = time.perf_counter() - t0
    pipe.save_pretrained(directory, safe_serialization=True)
    # Not random, but not a real editor either: the marker keeps its outputs labelled as such.
    info = {"what": "proxy FLUX.1 Kontext model trained on a synthetic edit task (measure.proxy)", "seed": cfg.seed}
    (directory / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(info) + "\n")
    log(f"trained in {seconds:.0f} s")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the model (created if missing)")
    parser.add_argument("--seed", type=int, default=ProxyConfig.seed)
    parser.add_argument("--vae-steps", type=int, default=ProxyConfig.vae_steps)
    parser.add_argument("--flow-steps", type=int, default=ProxyConfig.flow_steps)
    args = parser.parse_args(argv)
    cfg = ProxyConfig(seed=args.seed, vae_steps=args.vae_steps, flow_steps=args.flow_steps)
    out = write_proxy(args.directory, cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"wrote the proxy model to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
