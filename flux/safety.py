"""The safety checker every output goes through unless the request turns it off, and its weights.

Replicate's FLUX servers check each output in two stages, and so does this one:

1. The Stable Diffusion safety checker (diffusers' `StableDiffusionSafetyChecker`, weights
   CompVis/stable-diffusion-safety-checker): a CLIP ViT-L/14 image embedding compared with 17
   concept embeddings and 3 "special care" ones, each with its own threshold. It flags many
   harmless images, so on its own it would refuse too much.
2. Only for an image it flags, a second opinion from a ViT NSFW classifier (transformers'
   `ViTForImageClassification`, weights Falconsai/nsfw_image_detection, labels "normal" and "nsfw").

An image is unsafe when both flag it; an unsafe image is never written or returned.

Weights live in the model's weights directory, beside the FLUX components, so the weight archives
and a copied directory carry them:

    safety_checker/     StableDiffusionSafetyChecker: config.json + model.safetensors (or pytorch_model.bin)
    feature_extractor/  its CLIP image processor: preprocessor_config.json
    nsfw_classifier/    the ViT classifier and its image processor: config.json, model.safetensors,
                        preprocessor_config.json

(`safety_checker/` and `feature_extractor/` are the folder names of diffusers' Stable Diffusion
pipelines.) A folder that is missing is downloaded from its hub repository at setup (neither is
gated); a folder that is there is loaded strictly, like the model: a missing file or a missing,
unexpected or mis-shaped tensor stops setup with an error naming it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessorPil, ViTForImageClassification, ViTImageProcessorPil

from flux import clock
from flux.errors import WeightsError
from flux.model import load_strict
from flux.weights import hub_token

logger = logging.getLogger(__name__)

SAFETY_CHECKER = "safety_checker"
FEATURE_EXTRACTOR = "feature_extractor"
NSFW_CLASSIFIER = "nsfw_classifier"
CHECKER_FOLDERS = (SAFETY_CHECKER, FEATURE_EXTRACTOR, NSFW_CLASSIFIER)
NSFW_LABEL = "nsfw"
"""The classifier label that confirms the first stage's flag (the other one is "normal")."""

ENV_SWITCH = "FLUX_SAFETY_CHECKER"
"""`on` (the default) or `off`: a server started with `off` loads no checker and refuses every request that
does not set disable_safety_checker, rather than return an image that a client believes was checked."""

# diffusers' checker warns that "a black image will be returned instead" whenever it flags. Here a
# flagged image only gets a second opinion, and an unsafe one fails the prediction: the warning would
# say something untrue in the prediction's logs.
logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)


@dataclass(frozen=True)
class HubSource:
    """A hub repository and, for each file the checker needs from it, the folder it goes to."""

    repo: str
    files: tuple[tuple[str, str], ...]  # (file in the repository, folder in the weights directory)

    @property
    def folders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(folder for _, folder in self.files))


HUB_SOURCES = (
    # The repository has no safetensors file on its main branch; transformers reads the .bin with
    # torch.load(weights_only=True).
    HubSource(
        "CompVis/stable-diffusion-safety-checker",
        (
            ("config.json", SAFETY_CHECKER),
            ("pytorch_model.bin", SAFETY_CHECKER),
            ("preprocessor_config.json", FEATURE_EXTRACTOR),
        ),
    ),
    HubSource(
        "Falconsai/nsfw_image_detection",
        (
            ("config.json", NSFW_CLASSIFIER),
            ("model.safetensors", NSFW_CLASSIFIER),
            ("preprocessor_config.json", NSFW_CLASSIFIER),
        ),
    ),
)

Downloader = Callable[[str, str, Path], object]
"""(repository, file, folder): put the hub file into the folder."""


def hub_download(repo: str, filename: str, folder: Path) -> None:
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo, filename, local_dir=folder, token=hub_token())


def ensure_weights(weights_dir: str | Path, download: Downloader = hub_download) -> None:
    """Download the checker folders that `weights_dir` lacks from the hub.

    Each repository's files are downloaded beside the folders and renamed into place once complete,
    so a folder is there in full or not at all, and an interrupted download is simply repeated at
    the next setup. Folders already there are left as they are (and loaded strictly). Raises
    WeightsError naming the missing folders when the download fails (no network, offline mode,
    a read-only directory).
    """
    weights_dir = Path(weights_dir)
    for source in HUB_SOURCES:
        missing = [folder for folder in source.folders if not (weights_dir / folder).exists()]
        if not missing:
            continue
        logger.info("downloading %s from the hub into %s", ", ".join(f"{f}/" for f in missing), weights_dir)
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=".download-", dir=weights_dir))
            for filename, folder in source.files:
                if folder in missing:
                    download(source.repo, filename, staging / folder)
            for folder in missing:
                # huggingface_hub keeps download bookkeeping in local_dir/.cache
                shutil.rmtree(staging / folder / ".cache", ignore_errors=True)
                (staging / folder).rename(weights_dir / folder)
        except Exception as e:  # the hub client raises many types; all mean "no checker weights"
            raise WeightsError(
                f"the safety checker's {', '.join(f'{f}/' for f in missing)} are not in {weights_dir}, and downloading "
                f"them from {source.repo} failed ({e.__class__.__name__}: {e}). Put them there, or set "
                f"{ENV_SWITCH}=off to serve without a safety checker"
            ) from e
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class SafetyVerdict:
    """What the checker found for one image."""

    concept_flagged: bool  # the Stable Diffusion safety checker flagged it
    label: str | None  # the NSFW classifier's label; None when it did not run (nothing to confirm)
    nsfw_probability: float | None  # the classifier's probability of NSFW_LABEL, when it ran
    seconds: float  # both stages, preprocessing included

    @property
    def unsafe(self) -> bool:
        return self.concept_flagged and self.label == NSFW_LABEL

    def __str__(self) -> str:
        if not self.concept_flagged:
            return f"passed in {self.seconds:.3f} s"
        second = f"the NSFW classifier ({NSFW_LABEL} {self.nsfw_probability:.2f})"
        if self.unsafe:
            return f"flagged by the concept checker and by {second} in {self.seconds:.3f} s"
        return f"flagged by the concept checker, cleared by {second}: passed in {self.seconds:.3f} s"


class SafetyChecker:
    """The two-stage check of one output image; see the module docstring."""

    def __init__(
        self,
        concept_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessorPil,
        classifier: ViTForImageClassification,
        classifier_processor: ViTImageProcessorPil,
    ):
        labels = {str(label).lower(): int(i) for i, label in classifier.config.id2label.items()}
        if NSFW_LABEL not in labels:
            raise WeightsError(f"{NSFW_CLASSIFIER}/ has labels {sorted(labels)}, none of them {NSFW_LABEL!r}")
        self.concept_checker = concept_checker
        self.feature_extractor = feature_extractor
        self.classifier = classifier
        self.classifier_processor = classifier_processor
        self.labels = {i: label for label, i in labels.items()}
        self.nsfw_index = labels[NSFW_LABEL]

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path) -> SafetyChecker:
        """Load the three folders from `weights_dir` (on the CPU, float32); WeightsError names what is wrong."""
        weights_dir = Path(weights_dir)
        processors = {}
        for folder, processor_cls in (
            (FEATURE_EXTRACTOR, CLIPImageProcessorPil),
            (NSFW_CLASSIFIER, ViTImageProcessorPil),
        ):
            try:
                processors[folder] = processor_cls.from_pretrained(weights_dir / folder)
            except (OSError, ValueError, TypeError) as e:
                raise WeightsError(f"could not load {folder}/ from {weights_dir}: {e}") from e
        return cls(
            load_strict(StableDiffusionSafetyChecker, weights_dir, SAFETY_CHECKER),
            processors[FEATURE_EXTRACTOR],
            load_strict(ViTForImageClassification, weights_dir, NSFW_CLASSIFIER),
            processors[NSFW_CLASSIFIER],
        )

    def to(self, device: str | torch.device) -> SafetyChecker:
        """Move to `device`: the concept checker in float16 on a GPU (as Replicate runs it), float32
        elsewhere; the classifier (86M parameters) in float32 everywhere."""
        device = torch.device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.concept_checker.to(device, dtype)
        self.classifier.to(device, torch.float32)
        return self

    @torch.inference_mode()
    def check(self, image: PIL.Image.Image) -> SafetyVerdict:
        """Check one RGB image; the classifier runs only if the concept checker flags it."""
        start = clock.now(self.classifier.device)
        flagged = self._concept_flag(image)
        label, probability = self._classify(image) if flagged else (None, None)
        return SafetyVerdict(flagged, label, probability, clock.now(self.classifier.device) - start)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run both stages once, so that the first prediction does not pay for lazy initialisation
        (CUDA kernels, allocator pools). Every input is 224×224 after preprocessing: one run covers all."""
        grey = PIL.Image.new("RGB", (1024, 1024), (128, 128, 128))
        self._concept_flag(grey)
        self._classify(grey)

    def _concept_flag(self, image: PIL.Image.Image) -> bool:
        checker = self.concept_checker
        clip_input = self.feature_extractor(images=[image], return_tensors="pt").pixel_values
        # The checker also blacks out each flagged image in the list it is given. That copy is never
        # used (a flagged image is returned as it is if the classifier clears it, else not at all), so
        # it gets a 1×1 stand-in rather than a copy of the pixels.
        _, flags = checker(clip_input=clip_input.to(checker.device, checker.dtype), images=[np.zeros((1, 1, 3))])
        return bool(flags[0])

    def _classify(self, image: PIL.Image.Image) -> tuple[str, float]:
        """The classifier's label for `image` and its probability of NSFW_LABEL."""
        pixels = self.classifier_processor(images=[image], return_tensors="pt").pixel_values
        logits = self.classifier(pixel_values=pixels.to(self.classifier.device, self.classifier.dtype)).logits
        probabilities = logits[0].float().softmax(-1)
        return self.labels[int(probabilities.argmax())], float(probabilities[self.nsfw_index])


def checker_from_env(weights_dir: str | Path) -> SafetyChecker | None:
    """The checker for a server, per $FLUX_SAFETY_CHECKER: `on` (default) downloads missing folders
    (ensure_weights) and loads it on the CPU; `off` gives None."""
    switch = os.environ.get(ENV_SWITCH, "on").strip().lower()
    if switch == "off":
        logger.warning("%s=off: no safety checker; requests must set disable_safety_checker", ENV_SWITCH)
        return None
    if switch != "on":
        raise ValueError(f"{ENV_SWITCH} must be 'on' or 'off', got {switch!r}")
    ensure_weights(weights_dir)
    return SafetyChecker.from_pretrained(weights_dir)
