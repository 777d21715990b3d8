"""Where the weights come from: FLUX_WEIGHTS, else weights/FLUX.1-Kontext-dev, else the hub."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flux.errors import WeightsError

logger = logging.getLogger(__name__)

HUB_REPO = "black-forest-labs/FLUX.1-Kontext-dev"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "weights" / "FLUX.1-Kontext-dev"
# Only the diffusers-layout components; the repository also holds a 24 GB single-file checkpoint
# of the same transformer that this server never reads.
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "transformer/*",
    "vae/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
]


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def resolve_weights_dir() -> Path:
    """The weights directory: $FLUX_WEIGHTS if set, else weights/FLUX.1-Kontext-dev.

    If that directory does not exist and a hub token is set (HF_TOKEN), the model is downloaded
    into it first. The repository is gated: accept its licence on the hub with that account.
    """
    directory = Path(os.environ.get("FLUX_WEIGHTS") or DEFAULT_DIR)
    if directory.exists():
        return directory
    token = hub_token()
    if token is None:
        raise WeightsError(
            f"no weights at {directory}: set FLUX_WEIGHTS to a FLUX.1 Kontext [dev] directory in the diffusers "
            f"layout, or set HF_TOKEN to download {HUB_REPO} there"
        )
    from huggingface_hub import snapshot_download

    logger.info("downloading %s to %s", HUB_REPO, directory)
    try:
        snapshot_download(HUB_REPO, local_dir=directory, allow_patterns=HUB_PATTERNS, token=token)
    except Exception as e:  # the hub client raises many types; all mean "no weights"
        raise WeightsError(f"could not download {HUB_REPO} to {directory}: {e}") from e
    return directory
