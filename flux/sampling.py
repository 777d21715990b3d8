"""Kontext sampling as small functions, tensors in and tensors out.

Shapes: B batch, C latent channels (16), h × w latent size (pixels / 8), N = (h/2)·(w/2) packed
noise tokens of 4·C channels, M packed context tokens, L text tokens.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from flux.taylor_seer_utils import Extrapolation

# The served defaults, defined once.
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 2.5  # embedded guidance (FLUX.1 [dev] is guidance-distilled: no CFG pass)
TEXT_TOKENS = 512  # T5 tokens FLUX.1 [dev] was trained with


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


def time_shift(mu: float, t: float | torch.Tensor) -> float | torch.Tensor:
    """Shift t ∈ [0, 1] towards 1 (more time at high noise) by exp(mu). Takes a float or a tensor."""
    if not isinstance(t, torch.Tensor) and t <= 0.0:
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


def noised(latents: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """Where the straight path from `latents` (t = 0) to `noise` (t = 1) is at time t: the point a trajectory
    ending at `latents` passes through at t (rectified flow's forward process)."""
    return t * noise + (1.0 - t) * latents


def first_step(num_steps: int, strength: float) -> int:
    """The step an edit of `strength` (0-1) starts at: the first (1 - strength) of the steps are not run, and the
    input image, noised to the time of this step, is where the trajectory starts. As diffusers' img2img and
    inpainting pipelines count it (`get_timesteps`), so that the same strength runs the same steps."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


def pack_mask(mask: torch.Tensor, latent_height: int, latent_width: int, channels: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask of 0 and 1 -> (B, N, 4C) packed like the latents: each latent pixel takes the mask's
    value at its top-left pixel (nearest-neighbour downsampling, as diffusers' inpainting pipelines do)."""
    small = torch.nn.functional.interpolate(mask, size=(latent_height, latent_width))
    return pack(small.expand(-1, channels, -1, -1).contiguous())


@dataclass(frozen=True)
class SourceLatents:
    """The input image in the edit's trajectory (inpainting and strength below 1, as in diffusers' Kontext
    inpainting): the trajectory starts from it noised to the first step's time, and after every step the region
    outside the mask is put back where the input image's own trajectory is at that time."""

    latents: torch.Tensor  # (B, N, 4C) float32 packed latents of the input image at the output size
    mask: torch.Tensor | None = None  # (B, N, 4C) float32, 1 where the edit changes the image, 0 where it keeps it

    def start(self, noise: torch.Tensor, t: float) -> torch.Tensor:
        return noised(self.latents, noise, t)

    def keep(self, img: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """`img` (B, N, 4C) at time t with the kept region replaced by the input image's latents noised to t."""
        if self.mask is None:
            return img
        return (1 - self.mask) * noised(self.latents, noise, t) + self.mask * img


@dataclass(frozen=True)
class KontextInputs:
    """Everything the denoise loop needs, on the model's device."""

    noise: torch.Tensor  # (B, N, 4C) float32, the starting point of the trajectory
    context: torch.Tensor  # (B, M, 4C) packed context-image latents; never change
    img_ids: torch.Tensor  # (N + M, 3) noise ids [0, r, c] then context ids [1, r, c] (2, 3, ... for more images)
    txt: torch.Tensor  # (B, L, D) T5 hidden states
    txt_ids: torch.Tensor  # (L, 3) zeros
    vec: torch.Tensor  # (B, P) CLIP pooled embedding
    latent_height: int  # h of the output latents
    latent_width: int  # w of the output latents
    source: SourceLatents | None = None  # the input image's part in the trajectory; None: a plain edit from noise


def kontext_inputs(
    context_latents: torch.Tensor | Sequence[torch.Tensor],
    txt: torch.Tensor,
    vec: torch.Tensor,
    latent_height: int,
    latent_width: int,
    seed: int,
) -> KontextInputs:
    """Kontext conditioning: noise tokens first, the context image's tokens after them.

    context_latents: (B, C, hc, wc), already shifted and scaled VAE latents of the input image; or several
    such latents, one per reference image, whose tokens follow each other with first position-id coordinate
    1, 2, ... (each image its own plane, as the single context image has plane 1).
    """
    contexts = [context_latents] if isinstance(context_latents, torch.Tensor) else list(context_latents)
    b, c = contexts[0].shape[:2]
    device = contexts[0].device
    noise = pack(make_noise(seed, (b, c, latent_height, latent_width))).to(device)
    ids = [position_ids(latent_height, latent_width, 0)]
    ids += [position_ids(x.shape[2], x.shape[3], i) for i, x in enumerate(contexts, start=1)]
    return KontextInputs(
        noise=noise,
        context=torch.cat([pack(x) for x in contexts], dim=1),
        img_ids=torch.cat(ids).to(device),
        txt=txt,
        txt_ids=torch.zeros(txt.shape[1], 3, device=device),
        vec=vec,
        latent_height=latent_height,
        latent_width=latent_width,
    )


def transformer_kwargs(inputs: KontextInputs, img: torch.Tensor, t: float | torch.Tensor, guidance: float) -> dict:
    """The transformer's arguments for latents `img` (B, N, 4C) at time t (a float, or a (B,) tensor
    of per-example times): [noise | context] tokens, text, ids, embedded guidance."""
    dtype = inputs.txt.dtype
    b = img.shape[0]
    device = img.device
    timestep = t.to(device, dtype) if isinstance(t, torch.Tensor) else torch.full((b,), t, device=device, dtype=dtype)
    return dict(
        hidden_states=torch.cat([img.to(dtype), inputs.context.to(dtype)], dim=1),
        encoder_hidden_states=inputs.txt,
        pooled_projections=inputs.vec,
        timestep=timestep,
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
    return transformer(**transformer_kwargs(inputs, img, t, guidance))[0][:, : img.shape[1]]


@dataclass(frozen=True)
class Step:
    """What the loop did at one denoising step, as the progress callback sees it."""

    index: int  # 0-based
    t: float  # the step's schedule time (it integrates from t to the next time)
    computed: bool  # whether the transformer ran (False: TaylorSeer extrapolated)
    latents: torch.Tensor  # (B, N, 4C) float32, the latents the step started from
    velocity: torch.Tensor  # (B, N, 4C) float32, the velocity it integrated
    total: int  # the steps this loop runs (fewer than the schedule's at a strength below 1)


StepCallback = Callable[[Step], None]
"""Called after each step."""


class ComputePolicy(Protocol):
    """Decides, step by step, whether the transformer runs (the alternative to a fixed step map)."""

    def __call__(self, step: int, t: float, latents: torch.Tensor) -> bool: ...


def denoise(
    transformer: torch.nn.Module,
    inputs: KontextInputs,
    timesteps: Sequence[float],
    guidance: float,
    compute: Sequence[bool] | ComputePolicy,
    extrapolation: Extrapolation,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Euler integration of the velocity field from timesteps[0] (1 for an edit from noise) to 0; returns
    (B, N, 4C) float32 latents.

    `compute` says which steps run the transformer: a step map (one bool per step, from
    taylor_seer_utils.generate_compute_step_map) or a policy asked at each step. On a computed step
    the transformer runs on [noise tokens | context tokens] and the prediction is cut back to the
    noise tokens, which is all the extrapolation keeps; on a skipped step the velocity comes from
    `extrapolation` (taylor_seer_utils.TaylorSeerConfig for the shipped TaylorSeer; a fresh state per
    call, so nothing leaks between requests). Latents stay
    float32 whatever the model's dtype.

    With `inputs.source`, the trajectory starts from the input image noised to `timesteps[0]`, and the region its
    mask keeps is put back on the input image's trajectory after every step, computed or extrapolated (the
    extrapolation only ever sees the transformer's predictions).
    """
    if isinstance(compute, Sequence):
        if len(compute) != len(timesteps) - 1:
            raise ValueError(f"the compute step map has {len(compute)} entries for {len(timesteps) - 1} steps")
        step_map = compute

        def compute(step: int, t: float, latents: torch.Tensor) -> bool:
            return step_map[step]

    state = extrapolation.start()
    source = inputs.source
    noise = inputs.noise.float()
    img = noise if source is None else source.start(noise, timesteps[0])
    total = len(timesteps) - 1
    for step, (t_curr, t_next) in enumerate(itertools.pairwise(timesteps)):
        computed = compute(step, t_curr, img)
        if computed:
            pred = velocity(transformer, inputs, img, t_curr, guidance)
            state.update(step, pred, t_curr)
            v = pred.float()
        else:
            v = state.predict(step, t_curr)
        start = img
        img = img + (t_next - t_curr) * v
        if source is not None:
            img = source.keep(img, noise, t_next)
        if on_step is not None:
            on_step(Step(step, t_curr, computed, start, v, total))
    return img
