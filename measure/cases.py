"""Edit cases for the fidelity tools, prepared once, and the metrics that compare an edit with its reference:
what measure.fidelity (variants and accelerations) and measure.peers (other caches) both use.

A case is a prompt, a context image and a seed; preparing it encodes them and runs level `none` on it, the
reference every accelerated edit of the case is compared with (same noise, schedule and conditioning).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flux import sampling
from flux.pipeline import KontextEditor
from flux.taylor_seer_utils import TaylorSeerConfig

FLUX_BLOCKS = 57  # FLUX.1's transformer: 19 double-stream + 38 single-stream blocks


@dataclass(frozen=True)
class EditCase:
    prompt: str
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1], H and W multiples of 16
    seed: int


def synthetic_cases(n: int, size: int, seed: int = 1234) -> list[EditCase]:
    """The proxy's edit task: n (prompt, context image, seed) cases drawn with a fixed seed."""
    from measure.proxy import PROMPTS, make_examples

    ex = make_examples(torch.Generator("cpu").manual_seed(seed), n, size)
    return [EditCase(PROMPTS[int(ex.prompt_index[i])], ex.context[i : i + 1], seed + i) for i in range(n)]


MAX_PSNR = 100.0  # dB, for identical images, so that means over cases stay finite


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images with values in [0, 1], at most MAX_PSNR."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10 * math.log10(1.0 / mse))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03) of (B, C, H, W)
    images with values in [0, 1], per channel, over the valid region."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def decoded(editor: KontextEditor, tokens: torch.Tensor, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The final latents (B, C, h, w) of a trajectory's tokens, and their decoded image in [0, 1]."""
    latents = sampling.unpack(tokens, inputs.latent_height, inputs.latent_width)
    return latents, ((editor.decode(latents).float() + 1) / 2).clamp(0, 1)


@dataclass
class Reference:
    """A case's level-none edit: what every other edit of the case is compared with."""

    latents: torch.Tensor  # (1, C, h, w) final latents
    pixels: torch.Tensor  # (1, 3, H, W) in [0, 1]


@dataclass
class PreparedCase:
    """One edit case encoded once, with its level-none reference run."""

    inputs: sampling.KontextInputs
    timesteps: list[float]
    reference: Reference


@torch.inference_mode()
def prepare_cases(
    editor: KontextEditor,
    cases: Sequence[EditCase],
    num_inference_steps: int = sampling.DEFAULT_STEPS,
    guidance: float = sampling.DEFAULT_GUIDANCE,
) -> list[PreparedCase]:
    """Encode each case's prompt and image, draw its noise, and run level none on it: the reference
    every variant of the case is compared with."""
    transformer = editor.components.transformer
    prepared = []
    for case in cases:
        txt, vec = editor.encode_prompt(case.prompt)
        context = editor.encode_image(case.image)
        _, _, h, w = case.image.shape
        inputs = sampling.kontext_inputs(context, txt, vec, h // 8, w // 8, case.seed)
        timesteps = sampling.get_schedule(num_inference_steps, inputs.noise.shape[1], editor.schedule)
        every_step = [True] * num_inference_steps
        tokens = sampling.denoise(transformer, inputs, timesteps, guidance, every_step, TaylorSeerConfig())
        prepared.append(PreparedCase(inputs, timesteps, Reference(*decoded(editor, tokens, inputs))))
    return prepared
