"""Cog adapter for FLUX.1 Kontext [dev] editing: declares the inputs, calls flux, returns a file."""

import logging

from cog import BaseRunner, Input, Path

from flux import images, sampling
from flux.pipeline import MAX_EXTRA_IMAGES, MAX_GUIDANCE, MAX_SEED, MAX_STEPS, MIN_GUIDANCE, MIN_STEPS, MultiImageMode
from flux.taylor_seer_utils import SCHEDULE_NAMES
from serving.server import AUTO, MEGAPIXELS, RANDOM_SEED, EditServer, Inputs

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


class Predictor(BaseRunner):
    def setup(self) -> None:
        self.server = EditServer()

    def run(
        self,
        prompt: str = Input(description="Text instruction describing the edit, e.g. 'make the car red'."),
        input_image: Path = Input(description="Image to edit: jpeg, png, gif or webp."),
        input_images: list[Path] | None = Input(
            description=f"Up to {MAX_EXTRA_IMAGES} more reference images, e.g. a person and a place to put them in.",
            default=None,
        ),
        multi_image_mode: str = Input(
            description="With input_images: stitch puts all images side by side in one context image (what the "
            "model was trained on); separate gives each image its own context tokens (experimental).",
            choices=[mode.value for mode in MultiImageMode],
            default=MultiImageMode.STITCH.value,
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio of the output. match_input_image keeps the input's (snapped to the "
            "nearest resolution Kontext was trained on).",
            choices=images.ASPECT_RATIOS,
            default=images.MATCH_INPUT_IMAGE,
        ),
        megapixels: str = Input(
            description="Output size: 1 (about one megapixel), or 0.25 for a draft (every side halved, about 4x "
            "less work).",
            choices=list(MEGAPIXELS),
            default="1",
        ),
        num_inference_steps: int = Input(
            description="Denoising steps.", ge=MIN_STEPS, le=MAX_STEPS, default=sampling.DEFAULT_STEPS
        ),
        guidance: float = Input(
            description="How strongly to follow the prompt.",
            ge=MIN_GUIDANCE,
            le=MAX_GUIDANCE,
            default=sampling.DEFAULT_GUIDANCE,
        ),
        seed: int | None = Input(
            description="Random seed; -1 or blank for a random one.", ge=RANDOM_SEED, le=MAX_SEED, default=None
        ),
        output_format: str = Input(
            description="Format of the output image.", choices=[f.value for f in images.OutputFormat], default="webp"
        ),
        output_quality: int = Input(
            description="Quality for webp and jpg, 0-100. Ignored for png.", ge=0, le=100, default=80
        ),
        disable_safety_checker: bool = Input(
            description="Return the image without checking it for NSFW content.", default=False
        ),
        go_fast: bool = Input(
            description="Skip transformer calls on some steps with TaylorSeer (13 of 28 steps computed). "
            "Faster; may lose quality on complex edits.",
            default=True,
        ),
        acceleration: str = Input(
            description="TaylorSeer level. auto follows go_fast (true: go really fast, false: none); the others "
            "override it: none computes every step, go fast 18 of 28, go really fast 13 of 28; the front-loaded "
            "schedules make as many calls, more of them early (experimental).",
            choices=[AUTO, *SCHEDULE_NAMES],
            default=AUTO,
        ),
        lora_weights: str | None = Input(
            description="A LoRA for this edit: an http(s) URL or data URI of a .safetensors file, or a hub id "
            "owner/name.",
            default=None,
        ),
        lora_strength: float = Input(description="How strongly the LoRA applies.", ge=-1.0, le=3.0, default=1.0),
    ) -> Path:
        inputs = Inputs(
            prompt=prompt,
            input_image=input_image,
            input_images=input_images,
            multi_image_mode=multi_image_mode,
            aspect_ratio=aspect_ratio,
            megapixels=megapixels,
            num_inference_steps=num_inference_steps,
            guidance=guidance,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            go_fast=go_fast,
            acceleration=acceleration,
            lora_weights=lora_weights,
            lora_strength=lora_strength,
        )
        return Path(self.server.predict(inputs, self.record_metric))
