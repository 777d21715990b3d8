"""Cog adapter for FLUX.1 Kontext [dev] editing: declares the inputs, calls flux, returns a file."""

import logging
import pathlib
import shutil
import tempfile
import time

from cog import BaseRunner, Input, Path

from flux import images, optimize, safety, sampling
from flux.errors import InvalidInputError, UnsafeOutputError
from flux.hardware import serving_device
from flux.pipeline import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, MIN_GUIDANCE, MIN_STEPS, EditRequest, KontextEditor
from flux.taylor_seer_utils import AccelerationLevel
from flux.weights import resolve_weights_dir
from serving import downloads, memory

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

AUTO = "auto"
ACCELERATION_CHOICES = [AUTO, *(level.value for level in AccelerationLevel)]
RANDOM_SEED = -1  # as many image APIs have it; blank means random too


class Predictor(BaseRunner):
    def setup(self) -> None:
        # Input URLs: public hosts only, a total deadline and a size cap; failed fetches leave no file behind.
        downloads.limit_cog_downloads("input_image")
        # The weights (fetched from $FLUX_WEIGHTS_URL or the hub when missing) and a GPU, unless they are a
        # test model or FLUX_DEVICE=cpu; each logs what it found and how long it took.
        weights = resolve_weights_dir()
        device = serving_device(weights)
        # Before the model, so that missing checker weights fail setup in seconds, not after loading 34 GB.
        checker = safety.checker_from_env(weights)
        # Accelerations from $FLUX_ACCELERATIONS (default: flux.optimize's defaults for the device); with
        # compile on, this also warms up every served shape and keeps the compiled artifacts with the weights.
        t0 = time.perf_counter()
        self.editor = KontextEditor.from_pretrained(
            weights,
            device=device,
            accelerations=optimize.accelerations_from_env(),
            compile_cache=optimize.compile_cache_from_env(weights),
        )
        logging.info("setup: loaded and prepared the model on %s in %.1f s", device, time.perf_counter() - t0)
        if checker:
            checker.to(self.editor.components.device).warm_up()
        self.safety_checker = checker
        self._last_output_dir: str | None = None

    def run(
        self,
        prompt: str = Input(description="Text instruction describing the edit, e.g. 'make the car red'."),
        input_image: Path = Input(description="Image to edit: jpeg, png, gif or webp."),
        aspect_ratio: str = Input(
            description="Aspect ratio of the output. match_input_image keeps the input's (snapped to the "
            "nearest resolution Kontext was trained on).",
            choices=images.ASPECT_RATIOS,
            default=images.MATCH_INPUT_IMAGE,
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
            "override it: none computes every step, go fast 18 of 28, go really fast 13 of 28.",
            choices=ACCELERATION_CHOICES,
            default=AUTO,
        ),
    ) -> Path:
        # The server hands over uploads, data URIs and URLs as downloaded files (a Path); a plain
        # string is a path on this machine that the client typed, and must not be read.
        if not isinstance(input_image, pathlib.Path):
            raise InvalidInputError(
                "input_image", "must be an uploaded file, a data URI or an http(s) URL, not a path on the server"
            )
        if not disable_safety_checker and self.safety_checker is None:
            raise InvalidInputError(
                "disable_safety_checker",
                f"must be true on this server: it runs without a safety checker ({safety.ENV_SWITCH}=off)",
            )
        if acceleration == AUTO:
            acceleration = AccelerationLevel.GO_REALLY_FAST if go_fast else AccelerationLevel.NONE
        request = EditRequest(
            prompt=prompt,
            image=images.load_image(input_image),
            aspect_ratio=aspect_ratio,
            num_inference_steps=num_inference_steps,
            guidance=guidance,
            seed=None if seed == RANDOM_SEED else seed,
            acceleration=acceleration,
        )
        request.validate()
        request = request.with_seed()
        print(f"Using seed: {request.seed}")

        def progress(step: sampling.Step) -> None:
            print(f"Step {step.index + 1}/{num_inference_steps}" + ("" if step.computed else " (TaylorSeer)"))

        result = self.editor.edit(request, on_step=progress)
        print(f"Transformer calls: {result.transformer_calls} of {num_inference_steps} steps ({acceleration})")
        # Checked before anything is written: an unsafe image never reaches a file.
        if disable_safety_checker:
            print("Safety checker: off for this prediction (disable_safety_checker)")
        else:
            verdict = self.safety_checker.check(result.image)
            print(f"Safety checker: {verdict}")
            if verdict.unsafe:
                raise UnsafeOutputError()
        note = ""
        if result.random_weights:
            note = "generated with RANDOM test weights, not a real edit"
            print(f"Warning: {note}")
        # Each prediction writes into a fresh directory; the previous one has been read by the server
        # by the time the next prediction starts (one at a time), so it is removed then.
        if self._last_output_dir:
            shutil.rmtree(self._last_output_dir, ignore_errors=True)
        self._last_output_dir = tempfile.mkdtemp(prefix="flux-kontext-")
        output = Path(images.save_image(result.image, self._last_output_dir, output_format, output_quality, note))
        # This prediction's tensors are freed by now: hand the memory back, so that resident memory stays flat.
        memory.release_free_memory()
        return output
