"""One edit: prompt + image + options -> edited image."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from flux import clock, images, sampling
from flux.errors import InvalidInputError, NonFiniteOutputError
from flux.lora import LoraRequest, LoraSlot, check_strengths
from flux.model import FluxComponents, load_components
from flux.optimize import Accelerations, Shape, optimize
from flux.taylor_seer_utils import (
    MAX_ORDER,
    SCHEDULE_NAMES,
    AccelerationLevel,
    StepSchedule,
    TaylorSeerConfig,
    default_order,
    generate_compute_step_map,
)

logger = logging.getLogger(__name__)

MIN_STEPS, MAX_STEPS = 4, 50
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 10.0
MAX_SEED = 2**53 - 1
"""The largest seed: the largest integer every JSON client reads exactly (JavaScript's Number.MAX_SAFE_INTEGER),
and a float64 exactly, which is how Cog's schema writes bounds (so the schema's maximum is this number)."""
MAX_EXTRA_IMAGES = 4
MIN_STRENGTH, MAX_STRENGTH = 0.0, 1.0
"""strength's range: 1 starts from pure noise (a plain edit), lower values start from the input image noised to
that fraction of the schedule (only that fraction of the steps runs); 0 runs none and returns the input image."""
SEPARATE_CONTEXT_AREA = 2.0
"""In `separate` mode the reference images are scaled down together to about this many times one served
size (two megapixels at megapixels=1), so the context holds at most about 8,300 tokens whatever their count."""


class MultiImageMode(enum.StrEnum):
    """How several reference images condition the edit."""

    STITCH = "stitch"  # side by side in one context image: what the released model was trained on
    SEPARATE = "separate"  # each image its own context tokens, position-id plane 1, 2, ... (experimental)


@dataclass(frozen=True)
class EditRequest:
    """The inputs of one edit. Limits are checked by validate(), which names the bad input."""

    prompt: str
    image: PIL.Image.Image
    aspect_ratio: str = images.MATCH_INPUT_IMAGE
    num_inference_steps: int = sampling.DEFAULT_STEPS  # MIN_STEPS..MAX_STEPS
    guidance: float = sampling.DEFAULT_GUIDANCE  # embedded guidance, MIN_GUIDANCE..MAX_GUIDANCE (no CFG)
    seed: int | None = None  # None draws a random seed; 0 is a seed like any other
    acceleration: AccelerationLevel | StepSchedule = AccelerationLevel.GO_REALLY_FAST  # a level, or a schedule
    n_derivatives: int | None = None  # TaylorSeer order 1..MAX_ORDER; None: the level's default
    extra_images: tuple[PIL.Image.Image, ...] = ()  # up to MAX_EXTRA_IMAGES more reference images
    multi_image_mode: MultiImageMode = MultiImageMode.STITCH
    megapixels: float = 1.0  # one of images.MEGAPIXELS
    loras: tuple[LoraRequest, ...] = ()  # up to MAX_LORAS, fused in this order, each at its strength
    # With a mask or a strength below 1 the input image (and the mask) are resized to the output size, stretched
    # like every input is to its Kontext size, never cropped: a crop could cut away the region the mask marks.
    mask: PIL.Image.Image | None = None  # any mode, read as its luminance: white is edited, black kept
    strength: float = 1.0  # MIN_STRENGTH..MAX_STRENGTH: how far into the noise the edit starts

    def validate(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidInputError("prompt", "must be a non-empty instruction")
        if not isinstance(self.image, PIL.Image.Image):
            raise InvalidInputError("input_image", "must be an image")
        if self.aspect_ratio not in images.ASPECT_RATIOS:
            raise InvalidInputError("aspect_ratio", f"must be one of {images.ASPECT_RATIOS}, got {self.aspect_ratio!r}")
        _check_int("num_inference_steps", self.num_inference_steps, MIN_STEPS, MAX_STEPS)
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise InvalidInputError("guidance", f"must be a number, got {self.guidance!r}")
        if not (math.isfinite(self.guidance) and MIN_GUIDANCE <= self.guidance <= MAX_GUIDANCE):
            raise InvalidInputError(
                "guidance", f"must be between {MIN_GUIDANCE} and {MAX_GUIDANCE}, got {self.guidance}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if self.acceleration not in SCHEDULE_NAMES:
            raise InvalidInputError("acceleration", f"must be one of {SCHEDULE_NAMES}, got {self.acceleration!r}")
        if self.n_derivatives is not None:
            _check_int("n_derivatives", self.n_derivatives, 1, MAX_ORDER)
        if len(self.extra_images) > MAX_EXTRA_IMAGES:
            raise InvalidInputError(
                "input_images", f"holds at most {MAX_EXTRA_IMAGES} images, got {len(self.extra_images)}"
            )
        if not all(isinstance(img, PIL.Image.Image) for img in self.extra_images):
            raise InvalidInputError("input_images", "must be images")
        if self.multi_image_mode not in list(MultiImageMode):
            modes = [mode.value for mode in MultiImageMode]
            raise InvalidInputError("multi_image_mode", f"must be one of {modes}, got {self.multi_image_mode!r}")
        if self.megapixels not in images.MEGAPIXELS:
            raise InvalidInputError("megapixels", f"must be one of {list(images.MEGAPIXELS)}, got {self.megapixels!r}")
        if self.mask is not None and not isinstance(self.mask, PIL.Image.Image):
            raise InvalidInputError("mask", "must be an image")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise InvalidInputError("strength", f"must be a number, got {self.strength!r}")
        if not (math.isfinite(self.strength) and MIN_STRENGTH <= self.strength <= MAX_STRENGTH):
            raise InvalidInputError(
                "strength", f"must be between {MIN_STRENGTH} and {MAX_STRENGTH}, got {self.strength}"
            )
        check_strengths([item.strength for item in self.loras])

    def uses_input_latents(self) -> bool:
        """Whether the trajectory starts from, or keeps part of, the input image (a mask, or strength below 1)."""
        return self.mask is not None or self.strength < MAX_STRENGTH

    def context_images(self) -> list[tuple[PIL.Image.Image, tuple[int, int]]]:
        """The context image(s) and the size (width, height) each is encoded at."""
        scale = self.megapixels
        if not self.extra_images:
            return [(self.image, images.scale_size(images.kontext_size(*self.image.size), scale))]
        all_images = [self.image, *self.extra_images]
        if self.multi_image_mode == MultiImageMode.STITCH:
            stitched = images.stitch(all_images)
            return [(stitched, images.scale_size(images.kontext_size(*stitched.size), scale))]
        share = scale * min(1.0, SEPARATE_CONTEXT_AREA / len(all_images))
        return [(img, images.scale_size(images.kontext_size(*img.size), share, round_down=True)) for img in all_images]

    def with_seed(self) -> EditRequest:
        """This request with a seed: its own, or a random one if it has none."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbelow(2**32))


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidInputError(name, f"must be between {lo} and {hi}, got {value}")


@dataclass
class EditResult:
    image: PIL.Image.Image
    seed: int
    latents: torch.Tensor  # (1, C, h, w) final latents before VAE decoding (unscaled)
    transformer_calls: int
    random_weights: bool
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    context_tokens: int = 0  # packed tokens of the reference image(s)
    steps: int = 0  # denoising steps run: num_inference_steps, fewer at a strength below 1, 0 when none was needed
    edited_fraction: float = 1.0  # share of the output's latent pixels the edit changed (the mask's; 0: no step ran)
    lora_reused: bool | None = None  # whether the request's LoRAs were fused already; None: no LoRA ran


def served_shapes() -> list[Shape]:
    """The transformer shapes the server runs for representative inputs, the most common first: at each
    megapixels setting, match_input_image at every preferred Kontext resolution, each fixed aspect ratio with
    an input of that aspect ratio, and 2 to 1 + MAX_EXTRA_IMAGES reference images of one preferred resolution
    each, stitched and separate (other mixes of aspect ratios give other sizes: they are planned, or compiled
    for, at their first request when a backend works per shape)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    def shape(request: EditRequest) -> Shape:
        contexts = [size for _, size in request.context_images()]
        output = images.output_size(request.aspect_ratio, *request.image.size, request.megapixels)
        return Shape(*output, *contexts[0], more_contexts=tuple(contexts[1:]))

    def blank(width: int, height: int) -> PIL.Image.Image:  # only the aspect ratio matters
        return PIL.Image.new("RGB", (max(1, width // 16), max(1, height // 16)))

    resolutions = sorted(PREFERRED_KONTEXT_RESOLUTIONS, key=lambda wh: wh != (1024, 1024))
    shapes: list[Shape] = []
    for megapixels in images.MEGAPIXELS:
        requests = [EditRequest("", blank(w, h), megapixels=megapixels) for w, h in resolutions]
        requests += [
            EditRequest("", blank(*size), aspect_ratio=ratio, megapixels=megapixels)
            for ratio, size in images.ASPECT_RATIO_SIZES.items()
        ]
        for (w, h), extra, mode in itertools.product(resolutions, range(1, MAX_EXTRA_IMAGES + 1), MultiImageMode):
            image = blank(w, h)
            several = dict(extra_images=(image,) * extra, multi_image_mode=mode, megapixels=megapixels)
            requests.append(EditRequest("", image, **several))
        for request in requests:
            if (s := shape(request)) not in shapes:
                shapes.append(s)
    return shapes


class KontextEditor:
    """FLUX.1 Kontext [dev] editing with TaylorSeer step caching."""

    def __init__(self, components: FluxComponents):
        self.components = components
        self.schedule = sampling.ScheduleConfig.from_scheduler_config(components.scheduler.config)
        self.lora = LoraSlot(components.transformer)
        # What the denoise loop calls for each velocity: the transformer, or on several GPUs flux.ranks.Ranks,
        # which runs the call on every rank.
        self.velocity_model: Callable[..., tuple] = components.transformer

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        accelerations: Accelerations | None = None,
        compile_cache: str | Path | None = None,
        prepare: Callable[[torch.nn.Module], None] | None = None,
    ) -> KontextEditor:
        """Load from a diffusers-layout directory; bf16 on a GPU, float32 on the CPU by default.

        `accelerations` (default: none; "default" for the device's defaults) are applied to the
        transformer by flux.optimize.optimize(), which also warms up what they need of the served shapes
        and keeps the compiled artifacts in `compile_cache`; `prepare` goes to it (flux.parallel's context
        parallelism, put on before compile).
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        editor = cls(load_components(directory, device, dtype))
        if accelerations is not None:
            optimize(editor.components.transformer, accelerations, compile_cache, served_shapes(), prepare=prepare)
        return editor

    def _now(self) -> float:
        return clock.now(self.components.device)

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L, D) T5 hidden states (L = 512 for the real model) and (1, P) CLIP pooled embedding."""
        c = self.components
        # 512 for the real model; a small test model may declare a shorter text length.
        t5_len = min(sampling.TEXT_TOKENS, c.tokenizer_2.model_max_length)
        t5 = c.tokenizer_2(prompt, padding="max_length", max_length=t5_len, truncation=True, return_tensors="pt")
        n_t5 = len(c.tokenizer_2(prompt, truncation=False).input_ids)
        if n_t5 > t5_len:
            logger.warning("prompt is %d T5 tokens; only the first %d are used", n_t5, t5_len)
        clip_len = c.tokenizer.model_max_length
        clip = c.tokenizer(prompt, padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt")
        txt = c.text_encoder_2(t5.input_ids.to(c.device), output_hidden_states=False)[0]
        vec = c.text_encoder(clip.input_ids.to(c.device), output_hidden_states=False).pooler_output
        return txt.to(c.dtype), vec.to(c.dtype)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> (1, C, H/8, W/8) latents, shifted and scaled (distribution mode)."""
        vae = self.components.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) latents -> (1, 3, 8h, 8w) pixels in [-1, 1]."""
        vae = self.components.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    @torch.inference_mode()
    def edit(self, request: EditRequest, on_step: sampling.StepCallback | None = None) -> EditResult:
        """Run one edit. Raises InvalidInputError naming the input for a bad request."""
        request.validate()
        output_size = images.output_size(request.aspect_ratio, *request.image.size, request.megapixels)
        return self._edit(request, request.context_images(), output_size, on_step)

    def edit_at_size(
        self,
        request: EditRequest,
        context_size: tuple[int, int],
        output_size: tuple[int, int],
        on_step: sampling.StepCallback | None = None,
    ) -> EditResult:
        """edit() with the context image resized to `context_size` and an output of `output_size`
        ((width, height), multiples of 16) instead of the served sizes: for benchmarks at other resolutions.
        The request is assumed valid."""
        return self._edit(request, [(request.image, context_size)], output_size, on_step)

    @torch.inference_mode()
    def _edit(
        self,
        request: EditRequest,
        contexts: list[tuple[PIL.Image.Image, tuple[int, int]]],
        output_size: tuple[int, int],
        on_step: sampling.StepCallback | None,
    ) -> EditResult:
        request = request.with_seed()
        seed = request.seed
        out_w, out_h = output_size
        seconds: dict[str, float] = {}
        t0 = self._now()
        txt, vec = self.encode_prompt(request.prompt)
        seconds["text"] = self._now() - t0

        t0 = self._now()
        context = [self.encode_image(images.image_to_tensor(img, w, h)) for img, (w, h) in contexts]
        seconds["image"] = self._now() - t0

        inputs = sampling.kontext_inputs(context, txt, vec, out_h // 8, out_w // 8, seed)
        if request.uses_input_latents():
            t0 = self._now()
            same_image = len(contexts) == 1 and contexts[0][0] is request.image and contexts[0][1] == output_size
            inputs = dataclasses.replace(
                inputs, source=self._source(request, context[0] if same_image else None, output_size)
            )
            seconds["image"] += self._now() - t0
        timesteps = sampling.get_schedule(request.num_inference_steps, inputs.noise.shape[1], self.schedule)
        timesteps = timesteps[sampling.first_step(request.num_inference_steps, request.strength) :]
        steps = len(timesteps) - 1
        if why := _nothing_to_edit(request, inputs.source, steps):
            logger.warning("%s: the output is the input image through the VAE", why)
            tokens, calls, steps, lora_reused = inputs.source.latents, 0, 0, None
        else:
            step_map = generate_compute_step_map(request.acceleration, steps)
            order = request.n_derivatives
            if order is None:
                order = default_order(request.acceleration)
            # The request's LoRAs (or none) in the weights: kept from the last request when it had the same ones.
            lora_use = self.lora.use(request.loras)
            seconds.update(lora_use.seconds)
            lora_reused = lora_use.reused if request.loras else None
            t0 = self._now()
            tokens = sampling.denoise(
                self.velocity_model,
                inputs,
                timesteps,
                request.guidance,
                step_map,
                TaylorSeerConfig(order=order),
                on_step,
            )
            seconds["denoise"] = self._now() - t0
            calls = sum(step_map)
        # One read back to the host after the loop (the clock above has waited for the GPU already): NaN or
        # infinite latents would decode to a black picture that looks like a result.
        if not torch.isfinite(tokens).all():
            raise NonFiniteOutputError(int((~torch.isfinite(tokens)).sum()), tokens.numel())
        latents = sampling.unpack(tokens, inputs.latent_height, inputs.latent_width)

        t0 = self._now()
        image = images.tensor_to_image(self.decode(latents))
        seconds["decode"] = self._now() - t0
        return EditResult(
            image,
            seed,
            latents,
            calls,
            self.components.random_weights,
            seconds,
            context_tokens=inputs.context.shape[1],
            steps=steps,
            edited_fraction=_edited_fraction(inputs.source, steps),
            lora_reused=lora_reused,
        )

    def _source(
        self, request: EditRequest, encoded: torch.Tensor | None, output_size: tuple[int, int]
    ) -> sampling.SourceLatents:
        """The input image's latents at the output size (`encoded`, when the context image is exactly that) and
        the mask packed like them."""
        out_w, out_h = output_size
        if encoded is None:
            encoded = self.encode_image(images.image_to_tensor(request.image, out_w, out_h))
        mask = None
        if request.mask is not None:
            pixels = images.mask_to_tensor(request.mask, out_w, out_h).to(encoded.device)
            mask = sampling.pack_mask(pixels, out_h // 8, out_w // 8, encoded.shape[1])
        return sampling.SourceLatents(sampling.pack(encoded.float()), mask)


def _nothing_to_edit(request: EditRequest, source: sampling.SourceLatents | None, steps: int) -> str | None:
    """Why the edit has nothing to do (no step left, or a mask that keeps everything), or None."""
    if steps == 0:
        return f"strength {request.strength} leaves no step to run"
    if source is not None and source.mask is not None and not source.mask.any():
        return "the mask marks nothing to edit"
    return None


def _edited_fraction(source: sampling.SourceLatents | None, steps: int) -> float:
    """The share of the output's latent pixels the edit changed: 0 when no step ran, else 1 without a mask."""
    if steps == 0:
        return 0.0
    if source is None or source.mask is None:
        return 1.0
    return source.mask.mean().item()
