"""Kontext sampling as small functions, tensors in and tensors out.

Shapes: B batch, C latent channels (16), h × w latent size (pixels / 8), N = (h/2)·(w/2) packed
noise tokens of 4·C channels, M packed context tokens, L text tokens.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flux.taylor_seer_utils import (
    DEFAULT_N_DERIVATIVES,
    AdaptiveConfig,
    FirstBlockState,
    TaylorSeerConfig,
    TaylorSeerState,
)


@dataclass(frozen=True)
class ScheduleConfig:
    """The resolution-dependent time shift: mu is linear in the noise-token count through
    (base_seq_len, base_shift) and (max_seq_len, max_shift). Values from the scheduler config."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_scheduler_config(cls, config: dict) -> ScheduleConfig:
        return cls(
            base_seq_len=config.get("base_image_seq_len", cls.base_seq_len),
            max_seq_len=config.get("max_image_seq_len", cls.max_seq_len),
            base_shift=config.get("base_shift", cls.base_shift),
            max_shift=config.get("max_shift", cls.max_shift),
        )

    def mu(self, image_seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_seq_len)


def time_shift(mu: float, t: float) -> float:
    """Shift t ∈ [0, 1] towards 1 (more time at high noise) by exp(mu)."""
    if t <= 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def get_schedule(num_steps: int, image_seq_len: int, config: ScheduleConfig = ScheduleConfig()) -> list[float]:
    """num_steps + 1 times from 1 to 0: equal intervals, then time-shifted for the token count."""
    mu = config.mu(image_seq_len)
    return [time_shift(mu, 1.0 - i / num_steps) for i in range(num_steps + 1)]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 · w/2, 4C): each 2×2 patch becomes one token."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 · w/2, 4C) -> (B, C, h, w), the inverse of pack."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def position_ids(h: int, w: int, index: int) -> torch.Tensor:
    """(h/2 · w/2, 3) ids [index, row, col] for packed tokens: 0 for noise, 1 for the context image."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    return torch.stack([torch.full_like(rows, index), rows, cols], dim=-1).float()


def make_noise(seed: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Unit Gaussian latents (B, C, h, w) from a CPU generator, so a seed means the same noise on
    every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class KontextInputs:
    """Everything the denoise loop needs, on the model's device."""

    noise: torch.Tensor  # (B, N, 4C) float32, the starting point of the trajectory
    context: torch.Tensor  # (B, M, 4C) packed context-image latents; never change
    img_ids: torch.Tensor  # (N + M, 3) noise ids [0, r, c] then context ids [1, r, c]
    txt: torch.Tensor  # (B, L, D) T5 hidden states
    txt_ids: torch.Tensor  # (L, 3) zeros
    vec: torch.Tensor  # (B, P) CLIP pooled embedding
    latent_height: int  # h of the output latents
    latent_width: int  # w of the output latents


def prepare(
    context_latents: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    latent_height: int,
    latent_width: int,
    seed: int,
) -> KontextInputs:
    """Kontext conditioning: noise tokens first, the context image's tokens after them.

    context_latents: (B, C, hc, wc), already shifted and scaled VAE latents of the input image.
    """
    b, c, hc, wc = context_latents.shape
    device = context_latents.device
    noise = pack(make_noise(seed, (b, c, latent_height, latent_width))).to(device)
    img_ids = torch.cat([position_ids(latent_height, latent_width, 0), position_ids(hc, wc, 1)]).to(device)
    return KontextInputs(
        noise=noise,
        context=pack(context_latents),
        img_ids=img_ids,
        txt=txt,
        txt_ids=torch.zeros(txt.shape[1], 3, device=device),
        vec=vec,
        latent_height=latent_height,
        latent_width=latent_width,
    )


StepCallback = Callable[[int, bool], None]
"""Called after each step with (step index, whether the transformer ran)."""

ExtrapolationCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]
"""Called on each skipped step with (step index, time t, latents (B, N, 4C), extrapolated velocity),
before the Euler step: what a fidelity check needs to ask the transformer for the true velocity."""


def _transformer_kwargs(inputs: KontextInputs, img: torch.Tensor, t: float, guidance: float) -> dict:
    """The transformer's arguments for latents `img` (B, N, 4C) at time t: [noise | context] tokens."""
    dtype = inputs.txt.dtype
    b = img.shape[0]
    device = img.device
    return dict(
        hidden_states=torch.cat([img.to(dtype), inputs.context.to(dtype)], dim=1),
        encoder_hidden_states=inputs.txt,
        pooled_projections=inputs.vec,
        timestep=torch.full((b,), t, device=device, dtype=dtype),
        img_ids=inputs.img_ids,
        txt_ids=inputs.txt_ids,
        guidance=torch.full((b,), guidance, device=device, dtype=torch.float32),
        return_dict=False,
    )


def velocity(
    transformer: torch.nn.Module, inputs: KontextInputs, img: torch.Tensor, t: float, guidance: float
) -> torch.Tensor:
    """One transformer call: the predicted velocity (B, N, 4C) of the noise tokens, in the model's dtype.
    The prediction for the context tokens is cut away."""
    return transformer(**_transformer_kwargs(inputs, img, t, guidance))[0][:, : img.shape[1]]


class _FirstBlockDone(Exception):
    def __init__(self, residual: torch.Tensor):
        self.residual = residual


def first_block_residual(
    transformer: torch.nn.Module, inputs: KontextInputs, img: torch.Tensor, t: float, guidance: float
) -> torch.Tensor:
    """What the first double-stream block adds to the noise tokens' hidden states (B, N, D).

    Runs diffusers' own forward (embedders, rotary embedding, block 0) and stops it right after the
    first block with an exception from a forward hook, so nothing of the forward is duplicated here.
    """
    n = img.shape[1]

    def stop(module, args, kwargs, output):
        raise _FirstBlockDone(output[1][:, :n] - kwargs["hidden_states"][:, :n])

    handle = transformer.transformer_blocks[0].register_forward_hook(stop, with_kwargs=True)
    try:
        transformer(**_transformer_kwargs(inputs, img, t, guidance))
    except _FirstBlockDone as done:
        return done.residual
    finally:
        handle.remove()
    raise RuntimeError("the transformer returned without running its first block")


def denoise(
    transformer: torch.nn.Module,
    inputs: KontextInputs,
    timesteps: list[float],
    guidance: float,
    compute_step_map: list[bool],
    n_derivatives: int = DEFAULT_N_DERIVATIVES,
    on_step: StepCallback | None = None,
    *,
    seer: TaylorSeerConfig | None = None,
    adaptive: AdaptiveConfig | None = None,
    on_extrapolated: ExtrapolationCallback | None = None,
) -> torch.Tensor:
    """Euler integration of the velocity field from t=1 to t=0; returns (B, N, 4C) float32 latents.

    On a computed step the transformer runs on [noise tokens | context tokens] and the prediction
    is cut back to the noise tokens, which is all TaylorSeer keeps. On a skipped step the velocity
    is extrapolated (`seer`, default TaylorSeerConfig(order=n_derivatives)). Latents stay float32
    whatever the model's dtype.

    With `adaptive`, compute_step_map's True steps are always computed and each False step runs the
    first transformer block to decide (AdaptiveConfig); without it, the map is followed as it is.
    """
    if len(compute_step_map) != len(timesteps) - 1:
        raise ValueError(f"compute_step_map has {len(compute_step_map)} entries for {len(timesteps) - 1} steps")
    state = TaylorSeerState(seer if seer is not None else TaylorSeerConfig(order=n_derivatives))
    first_block = FirstBlockState(adaptive) if adaptive is not None else None
    img = inputs.noise.float()
    for step, (t_curr, t_next) in enumerate(itertools.pairwise(timesteps)):
        computed = compute_step_map[step]
        residual = None
        if not computed and first_block is not None:
            residual = first_block_residual(transformer, inputs, img, t_curr, guidance)
            computed = first_block.should_compute(residual)
            first_block.update(computed, residual)
        if computed:
            pred = velocity(transformer, inputs, img, t_curr, guidance)
            state.update(step, pred, t_curr)
            v = pred.float()
        else:
            v = state.predict(step, t_curr)
            if on_extrapolated is not None:
                on_extrapolated(step, t_curr, img, v)
        img = img + (t_next - t_curr) * v
        if on_step is not None:
            on_step(step, computed)
    return img
