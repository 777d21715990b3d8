"""Cog adapter for FLUX.1 Kontext [dev] editing: declares the inputs, calls the server, returns a file.

`cog build` reads this file without running it (a static parse: script/cog_parse.py says which forms it
reads), so every Input() keyword is a literal written here. tests/test_schema.py holds each literal against the
constant the library validates with, so the two cannot drift.
"""

import logging

from cog import BaseRunner, Input, Path

from serving.server import EditServer, Inputs

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


class Predictor(BaseRunner):
    def setup(self) -> None:
        self.server = EditServer()

    def healthcheck(self) -> bool:
        """coglet's health check: false (UNHEALTHY) once a server on several GPUs has lost a rank."""
        return self.server.healthy()

    def run(
        self,
        prompt: str = Input(description="Text instruction describing the edit, e.g. 'make the car red'."),
        input_image: Path = Input(
            description="Image to edit: jpeg, png, gif (first frame), webp, or what else Pillow reads (bmp, tiff, ...)."
        ),
        input_images: list[Path] | None = Input(
            description="Up to 4 more reference images, e.g. a person and a place to put them in.",
            default=None,
        ),
        multi_image_mode: str = Input(
            description="With input_images: stitch puts all images side by side in one context image (what the model was trained on); separate gives each image its own context tokens (experimental).",
            choices=["stitch", "separate"],
            default="stitch",
        ),
        mask: Path | None = Input(
            description="Where to edit: white is edited, black is kept (any size, resized to the output with the input image; colours read as their brightness, transparent as black).",
            default=None,
        ),
        strength: float = Input(
            description="How far into the noise the edit starts: 1 starts from noise; lower values start from the input image and keep more of it (only that share of the steps runs).",
            ge=0,
            le=1,
            default=1.0,
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio of the output. match_input_image keeps the input's (snapped to the nearest resolution Kontext was trained on).",
            choices=[
                "match_input_image",
                "1:1",
                "16:9",
                "21:9",
                "3:2",
                "2:3",
                "4:5",
                "5:4",
                "3:4",
                "4:3",
                "9:16",
                "9:21",
            ],
            default="match_input_image",
        ),
        megapixels: str = Input(
            description="Output size, a string: 1 (about one megapixel), or 0.25 for a draft (every side halved, about 4x less work).",
            choices=["1", "0.25"],
            default="1",
        ),
        num_inference_steps: int = Input(description="Denoising steps.", ge=4, le=50, default=28),
        guidance: float = Input(description="How strongly to follow the prompt.", ge=0, le=10, default=2.5),
        seed: int | None = Input(
            description="Random seed; -1 or blank for a random one. At most 9007199254740991 (2^53 - 1).",
            ge=-1,
            le=9007199254740991,
            default=None,
        ),
        output_format: str = Input(
            description="Format of the output image.", choices=["webp", "jpg", "png"], default="webp"
        ),
        output_quality: int = Input(
            description="Quality for webp and jpg, 0-100. Ignored for png.", ge=0, le=100, default=80
        ),
        disable_safety_checker: bool = Input(
            description="Return the image without checking it for NSFW content.", default=False
        ),
        go_fast: bool = Input(
            description="Skip transformer calls on some steps with TaylorSeer (13 of 28 steps computed). Faster; may lose quality on complex edits.",
            default=True,
        ),
        acceleration: str = Input(
            description="TaylorSeer level. auto follows go_fast (true: go really fast, false: none); the others override it: none computes every step, go fast 18 of 28, go really fast 13 of 28; the front-loaded schedules make as many calls, more of them early (experimental).",
            choices=[
                "auto",
                "none",
                "go fast",
                "go really fast",
                "go fast, front-loaded",
                "go really fast, front-loaded",
            ],
            default="auto",
        ),
        lora_weights: list[str] | None = Input(
            description="Up to 3 LoRAs for this edit, as a list: each an http(s) URL or data URI of a .safetensors file, or a hub id owner/name. They stay loaded while the next requests ask for the same ones.",
            default=None,
        ),
        lora_strength: list[float] | None = Input(
            description="How strongly each LoRA applies, as a list in the order of lora_weights, each from -1 to 3; left out, 1 for each.",
            ge=-1,
            le=3,
            default=None,
        ),
    ) -> Path:
        inputs = Inputs(
            prompt=prompt,
            input_image=input_image,
            input_images=input_images,
            multi_image_mode=multi_image_mode,
            mask=mask,
            strength=strength,
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
