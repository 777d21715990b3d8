"""The FLUX.1 Kontext components and strict loading from a diffusers-layout directory.

The classes are the libraries' own: diffusers' FluxTransformer2DModel and AutoencoderKL,
transformers' CLIPTextModel and T5EncoderModel with their tokenizers. The libraries fill missing
tensors with fresh random values and only warn; here a missing, unexpected or mis-shaped tensor
is an error that names the component and the tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedModel, T5EncoderModel, T5Tokenizer

from flux.errors import WeightsError

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"
"""A file of this name in a weights directory marks a test model (random or proxy weights): its
outputs are labelled as not real edits, and it may run without a GPU."""

# subfolder -> the class its weights load into
_MODELS = {
    "transformer": FluxTransformer2DModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": T5EncoderModel,
}
_TOKENIZERS = {"tokenizer": CLIPTokenizer, "tokenizer_2": T5Tokenizer}
_COMPONENTS = ("scheduler", *_MODELS, *_TOKENIZERS)
REQUIRED_ENTRIES = ("model_index.json", *_COMPONENTS)


@dataclass
class FluxComponents:
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel  # CLIP-L: pooled embedding
    text_encoder_2: T5EncoderModel  # T5-XXL: per-token embeddings
    tokenizer: CLIPTokenizer
    tokenizer_2: T5Tokenizer
    scheduler: FlowMatchEulerDiscreteScheduler  # only its config is read: the time-shift parameters
    random_weights: bool  # True for the tiny test model: outputs are not real edits

    @classmethod
    def from_pipeline(cls, pipe: FluxKontextPipeline, random_weights: bool = True) -> FluxComponents:
        """The components of a diffusers FluxKontextPipeline built in memory (the synthetic models)."""
        return cls(**{name: getattr(pipe, name) for name in _COMPONENTS}, random_weights=random_weights)

    def diffusers_pipeline(self) -> FluxKontextPipeline:
        """diffusers' own FluxKontextPipeline on these components (the speed baseline), progress bar off."""
        pipe = FluxKontextPipeline(**{name: getattr(self, name) for name in _COMPONENTS})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype


def _check_loading_info(subfolder: str, cls: type, info: dict) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        # mismatched keys come as (name, shape in the file, shape of the model)
        keys = sorted(
            f"{k[0]} ({list(k[1])} in the file, {list(k[2])} expected)" if isinstance(k, tuple) else str(k)
            for k in info.get(kind) or []
        )
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if info.get("error_msgs"):
        problems.append("errors: " + "; ".join(map(str, info["error_msgs"])))
    if problems:
        raise WeightsError(f"{subfolder}/ does not match {cls.__name__}: " + "; ".join(problems))


def load_strict(cls: type, directory: Path, subfolder: str, **kwargs) -> torch.nn.Module:
    """`cls.from_pretrained(directory, subfolder=subfolder, **kwargs)` in eval mode without gradients,
    where a missing file, a missing, unexpected or mis-shaped tensor is a WeightsError naming it."""
    if issubclass(cls, PreTrainedModel):
        # Without this, transformers answers a mis-shaped tensor with a bare RuntimeError that points
        # at a report printed to the log; with it, the tensor is listed in the loading info (and the
        # model is then refused below, never used with a re-initialised tensor).
        kwargs.setdefault("ignore_mismatched_sizes", True)
    try:
        try:
            model, info = cls.from_pretrained(directory, subfolder=subfolder, output_loading_info=True, **kwargs)
        except NotImplementedError as e:
            if "meta tensor" not in str(e) or "device_map" not in kwargs:
                raise
            # With device_map, a tensor the files lack stays on the meta device, and placing the model fails
            # before the library reports which one: on this error path only, load again without it, for the
            # loading info that names it.
            kwargs = {k: v for k, v in kwargs.items() if k != "device_map"}
            model, info = cls.from_pretrained(directory, subfolder=subfolder, output_loading_info=True, **kwargs)
            _check_loading_info(subfolder, cls, info)
            raise WeightsError(f"could not load {subfolder}/ from {directory}: {e}") from e
    except (OSError, ValueError) as e:
        raise WeightsError(f"could not load {subfolder}/ from {directory}: {e}") from e
    _check_loading_info(subfolder, cls, info)
    return model.eval().requires_grad_(False)


def _load_model(directory: Path, subfolder: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """One component, its tensors read from the file straight onto `device` (device_map): one tensor at a time
    passes through host memory, never the whole component (the transformer alone is 24 GB in bfloat16)."""
    dtype_kw = "torch_dtype" if subfolder in ("transformer", "vae") else "dtype"
    return load_strict(_MODELS[subfolder], directory, subfolder, **{dtype_kw: dtype, "device_map": str(device)})


def load_components(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> FluxComponents:
    """Load every component from `directory` (the layout of black-forest-labs/FLUX.1-Kontext-dev).

    Raises WeightsError naming the missing entry, file or tensor. Never falls back to random
    weights; a test model is flagged by its RANDOM_WEIGHTS_MARKER file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"weights directory {directory} does not exist")
    missing = [name for name in REQUIRED_ENTRIES if not (directory / name).exists()]
    if missing:
        raise WeightsError(f"weights directory {directory} is missing: {', '.join(missing)}")
    try:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(directory, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise WeightsError(f"could not read scheduler/ from {directory}: {e}") from e

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # device_map wants one device, not "cuda"
    models = {name: _load_model(directory, name, dtype, device) for name in _MODELS}
    tokenizers = {}
    for name, cls in _TOKENIZERS.items():
        try:
            tokenizers[name] = cls.from_pretrained(directory / name)
        except (OSError, ValueError, TypeError) as e:
            raise WeightsError(f"could not load {name}/ from {directory}: {e}") from e
    random_weights = (directory / RANDOM_WEIGHTS_MARKER).exists()
    if random_weights:
        logger.warning("%s is a test model (random or proxy weights): outputs are not real edits", directory)
    return FluxComponents(**models, **tokenizers, scheduler=scheduler, random_weights=random_weights)


def load_transformer(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> FluxTransformer2DModel:
    """The transformer alone, loaded as load_components() loads it: what a worker process of a server on several
    GPUs needs (rank 0 encodes the text and the images and decodes the latents)."""
    directory = Path(directory)
    if not (directory / "transformer").is_dir():
        raise WeightsError(f"weights directory {directory} is missing: transformer")
    return _load_model(directory, "transformer", dtype, torch.device(device))
