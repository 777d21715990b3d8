"""What the Cog predictor does with a request, apart from declaring its inputs (predict.py).

Setup: capped, public-only input downloads; the weights (fetched when missing) on a GPU; the safety
checker; the model with its accelerations. A prediction: the inputs become an EditRequest (files named by
their input when they cannot be read), the edit runs, the output is checked before anything is written,
written into a fresh directory, and the prediction's figures are recorded as Cog metrics.
"""

from __future__ import annotations

import importlib.metadata
import logging
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flux import images, lora, optimize, safety, sampling
from flux.errors import InvalidInputError, UnsafeOutputError
from flux.hardware import serving_device
from flux.parallel import ParallelSettings
from flux.pipeline import EditRequest, EditResult, KontextEditor, served_shapes
from flux.ranks import Ranks
from flux.taylor_seer_utils import AccelerationLevel
from flux.weights import resolve_weights_dir, weights_directory
from serving import downloads, memory, openapi
from serving.lora_files import LoraCache

logger = logging.getLogger(__name__)

TESTED_COGLET = "0.23.1"  # the coglet release the tests run (requirements-dev.txt); script/cog pins the image to it
AUTO = "auto"
RANDOM_SEED = -1  # as many image APIs have it; blank means random too
MEGAPIXELS = {"1": 1.0, "0.25": 0.25}  # as Replicate's FLUX models take it: a string choice

RecordMetric = Callable[[str, Any], None]


@dataclass(frozen=True)
class Inputs:
    """The inputs predict.py declares, as Cog hands them over."""

    prompt: str
    input_image: object  # a pathlib.Path for a valid file input (see downloads.file_input)
    input_images: list | None
    multi_image_mode: str
    mask: object  # None, or a file input like input_image
    strength: float
    aspect_ratio: str
    megapixels: str
    num_inference_steps: int
    guidance: float
    seed: int | None
    output_format: str
    output_quality: int
    disable_safety_checker: bool
    go_fast: bool
    acceleration: str
    lora_weights: list[str] | None
    lora_strength: list[float] | None


class EditServer:
    """The model, its safety checker and the LoRA cache, set up once; then one prediction at a time."""

    def __init__(self) -> None:
        _log_server_versions()
        # The schema coglet validates with, read when setup ends: `null` accepted where it says nullable, the
        # items of list inputs checked against their bounds.
        openapi.rewrite_schema_file()
        # Input URLs: public hosts only, a total deadline and a size cap; failed fetches leave no file behind.
        downloads.limit_cog_downloads()
        # A GPU, unless the weights already here are a test model or FLUX_DEVICE=cpu: checked before any fetch,
        # so that a container without its GPU fails in seconds instead of after downloading 34 GB.
        directory = weights_directory()
        device = serving_device(directory)
        # The weights, fetched from $FLUX_WEIGHTS_URL or the hub when missing; logs where they came from.
        weights = resolve_weights_dir(directory)
        # Before the model, so that missing checker weights fail setup in seconds, not after loading 34 GB.
        checker = safety.checker_from_env(weights)
        # Accelerations from $FLUX_ACCELERATIONS (default: flux.optimize's defaults for the device); with
        # compile on, this also warms up every served shape and keeps the compiled artifacts with the weights.
        t0 = time.perf_counter()
        accelerations = optimize.resolve(optimize.accelerations_from_env(), device)
        compile_cache = optimize.compile_cache_from_env(weights)
        # FLUX_GPUS > 1: worker processes for the other GPUs, which start loading now (flux.ranks).
        self.ranks = parallel_ranks(weights, device, accelerations, compile_cache)
        try:
            self.editor = KontextEditor.from_pretrained(
                weights,
                device=device,
                accelerations=accelerations,
                compile_cache=self.ranks.rank_cache(0) if self.ranks else compile_cache,
                prepare=self.ranks.prepare if self.ranks else None,
            )
            if self.ranks:
                self.ranks.serve(self.editor, served_shapes())
        except BaseException as e:
            if self.ranks:
                raise self.ranks.setup_failed(e) from e
            raise
        logger.info("setup: loaded and prepared the model on %s in %.1f s", device, time.perf_counter() - t0)
        if checker:
            checker.to(self.editor.components.device).warm_up()
        self.safety_checker = checker
        self.lora_cache = LoraCache.from_env()
        self._last_output_dir: str | None = None

    def request(self, inputs: Inputs) -> EditRequest:
        """The EditRequest for `inputs`, validated; an input that cannot be used raises InvalidInputError."""
        if not inputs.disable_safety_checker and self.safety_checker is None:
            raise InvalidInputError(
                "disable_safety_checker",
                f"must be true on this server: it runs without a safety checker ({safety.ENV_SWITCH}=off)",
            )
        images.check_output_options(inputs.output_format, inputs.output_quality)
        image = images.load_image(downloads.file_input("input_image", inputs.input_image))
        extras = tuple(
            images.load_image(downloads.file_input("input_images", path), "input_images")
            for path in inputs.input_images or ()
        )
        mask = None
        if inputs.mask is not None:
            mask = images.load_mask(downloads.file_input("mask", inputs.mask))
        acceleration = inputs.acceleration
        if acceleration == AUTO:
            acceleration = AccelerationLevel.GO_REALLY_FAST if inputs.go_fast else AccelerationLevel.NONE
        loras = self.loras(inputs.lora_weights or [], inputs.lora_strength)
        request = EditRequest(
            prompt=inputs.prompt,
            image=image,
            aspect_ratio=inputs.aspect_ratio,
            num_inference_steps=inputs.num_inference_steps,
            guidance=inputs.guidance,
            seed=None if inputs.seed == RANDOM_SEED else inputs.seed,
            acceleration=acceleration,
            extra_images=extras,
            multi_image_mode=inputs.multi_image_mode,
            megapixels=MEGAPIXELS.get(inputs.megapixels, inputs.megapixels),
            loras=loras,
            mask=mask,
            strength=inputs.strength,
        )
        request.validate()
        return request.with_seed()

    def loras(self, sources: list, strengths: list | None) -> tuple[lora.LoraRequest, ...]:
        """lora_weights and lora_strength (one per LoRA, in the same order; left out: each the default) as local
        files, with the digests the cache computed while writing them, and strengths. Counts and strengths are
        checked before anything is fetched."""
        if strengths is None:
            strengths = [lora.LoraRequest.__dataclass_fields__["strength"].default] * len(sources)
        if len(strengths) != len(sources):
            raise InvalidInputError(
                "lora_strength",
                f"holds {len(strengths)} values for {len(sources)} LoRAs: one per LoRA in lora_weights, in its order",
            )
        lora.check_strengths(strengths)
        files = self.lora_cache.resolve_all(sources)  # as one: none of them makes room for another
        return tuple(lora.LoraRequest(f.path, s, f.sha256) for f, s in zip(files, strengths, strict=True))

    def healthy(self) -> bool:
        """False once a rank of a server on several GPUs is lost (it cannot edit until restarted)."""
        return self.ranks is None or self.ranks.healthy

    def predict(self, inputs: Inputs, record_metric: RecordMetric) -> pathlib.Path:
        """Run one prediction and return the output file."""
        if self.ranks:
            self.ranks.new_prediction()  # a lost rank fails every prediction at once, before its inputs are read
        request = self.request(inputs)
        print(f"Using seed: {request.seed}")

        def progress(step: sampling.Step) -> None:
            print(f"Step {step.index + 1}/{step.total}" + ("" if step.computed else " (TaylorSeer)"))

        result = self.editor.edit(request, on_step=progress)
        print(f"Transformer calls: {result.transformer_calls} of {result.steps} steps ({request.acceleration})")
        # Checked before anything is written: an unsafe image never reaches a file.
        if inputs.disable_safety_checker:
            print("Safety checker: off for this prediction (disable_safety_checker)")
        else:
            verdict = self.safety_checker.check(result.image)
            result.seconds["safety"] = verdict.seconds
            print(f"Safety checker: {verdict}")
            if verdict.unsafe:
                raise UnsafeOutputError()
        record(record_metric, request, result)
        note = ""
        if result.random_weights:
            note = "generated with RANDOM test weights, not a real edit"
            print(f"Warning: {note}")
        # Each prediction writes into a fresh directory; the previous one has been read by the server
        # by the time the next prediction starts (one at a time), so it is removed then.
        if self._last_output_dir:
            shutil.rmtree(self._last_output_dir, ignore_errors=True)
        self._last_output_dir = tempfile.mkdtemp(prefix="flux-kontext-")
        output = images.save_image(
            result.image, self._last_output_dir, inputs.output_format, inputs.output_quality, note
        )
        # This prediction's tensors are freed by now: hand the memory back, so that resident memory stays flat.
        memory.release_free_memory()
        return output


def parallel_ranks(weights, device: str, accelerations, compile_cache) -> Ranks | None:
    """The worker processes of FLUX_GPUS > 1 (flux.parallel's settings), started; None for one GPU."""
    settings = ParallelSettings.from_env(device)
    if not settings.enabled:
        return None
    return Ranks.start(settings, weights, device, accelerations, compile_cache)


def _log_server_versions() -> None:
    """Log the Cog SDK and coglet releases serving this process; warn when coglet is not the tested one
    (serving/downloads.py relies on cog internals of that release)."""
    found = {}
    for package in ("cog", "coglet"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    logger.info("server: cog %s, coglet %s", found["cog"], found["coglet"])
    if found["coglet"] != TESTED_COGLET:
        logger.warning(
            "coglet %s is not %s, the release this model is tested with: build with script/cog (COGLET_WHEEL)",
            found["coglet"],
            TESTED_COGLET,
        )


def record(record_metric: RecordMetric, request: EditRequest, result: EditResult) -> None:
    """The prediction's figures, in its `metrics` (Cog's record_metric; nested names with dots)."""
    record_metric("transformer_calls", result.transformer_calls)
    record_metric("steps", result.steps)
    record_metric("seed", result.seed)
    record_metric("acceleration", str(request.acceleration))
    record_metric("context_tokens", result.context_tokens)
    if request.uses_input_latents():  # a mask or a strength below 1: 0 when no step ran
        record_metric("edited_fraction", round(result.edited_fraction, 4))
    if request.loras:
        record_metric("loras", len(request.loras))
    if result.lora_reused is not None:
        record_metric("lora_reused", result.lora_reused)
    for phase, seconds in result.seconds.items():
        record_metric(f"seconds.{phase}", round(seconds, 4))
