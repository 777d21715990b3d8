"""Where the weights come from, in this order:

1. $FLUX_WEIGHTS (default weights/FLUX.1-Kontext-dev), when it already holds a complete model;
2. else $FLUX_WEIGHTS_URL: one or more URLs of plain .tar archives packed by script/pack-weights, separated
   by commas (what fits in cog.yaml's `environment`, which becomes an unquoted Dockerfile ENV line) or
   whitespace, fetched with `pget -x` when pget is on PATH (as in the container), else in Python;
3. else $HF_TOKEN: the diffusers folders of the gated hub repository (for people running their own GPU).

Replicate gives a model no hub token, so a deployment fetches archives (2). A fetch lands in a staging
directory beside the target and is renamed into place only when complete and verified, under a lock, so a
setup killed midway never leaves a directory that the next setup trusts, and two servers sharing a volume
do not fetch at once. An incomplete directory found in the way is moved aside, never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from flux import weight_archives
from flux.errors import WeightsError

logger = logging.getLogger(__name__)

ENV_WEIGHTS = "FLUX_WEIGHTS"
ENV_WEIGHTS_URL = "FLUX_WEIGHTS_URL"
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


def weights_urls() -> list[str]:
    """The archive URLs in $FLUX_WEIGHTS_URL (separated by commas or whitespace), checked to be http(s). A URL
    with a comma of its own must write it as %2C."""
    urls = [url for url in re.split(r"[,\s]+", os.environ.get(ENV_WEIGHTS_URL, "")) if url]
    for url in urls:
        weight_archives.check_url(url)
    return urls


def weights_directory() -> Path:
    """Where the weights are, or will be fetched to: $FLUX_WEIGHTS, else weights/FLUX.1-Kontext-dev."""
    return Path(os.environ.get(ENV_WEIGHTS) or DEFAULT_DIR)


def resolve_weights_dir(directory: Path | None = None) -> Path:
    """The weights directory (default: weights_directory()), fetched first if it is missing or incomplete (see
    the module docstring).

    With nothing to fetch from, an incomplete directory is returned as it is, for the strict loader to name
    what is wrong; a missing one is an error that says what to set.
    """
    directory = Path(directory) if directory is not None else weights_directory()
    missing = weight_archives.missing_entries(directory)
    if not missing:
        logger.info("weights: %s (already present)", directory)
        return directory
    urls = weights_urls()
    token = hub_token()
    if not urls and token is None:
        if directory.exists():
            return directory
        raise WeightsError(
            f"no weights at {directory}: set FLUX_WEIGHTS to a FLUX.1 Kontext [dev] directory in the diffusers "
            f"layout, FLUX_WEIGHTS_URL to the URLs of its archives (script/pack-weights), or HF_TOKEN to "
            f"download {HUB_REPO} there"
        )
    with _lock(directory):
        missing = weight_archives.missing_entries(directory)
        if not missing:  # another process fetched them while this one waited
            logger.info("weights: %s (fetched by another process)", directory)
            return directory
        if directory.exists():
            logger.warning("weights: %s is incomplete (missing %s); fetching", directory, ", ".join(missing))
        t0 = time.perf_counter()
        if urls:
            origin = " ".join(weight_archives.redact(u) for u in urls)
            pget = weight_archives.which_pget()
            logger.info("weights: fetching %s into %s with %s", origin, directory, pget or "a Python fetch")
            _install(directory, lambda staging: weight_archives.fetch_archives(urls, staging, pget))
        else:
            origin = f"the hub ({HUB_REPO})"
            _download_from_hub(directory, token)
        logger.info("weights: %s fetched from %s in %.1f s", directory, origin, time.perf_counter() - t0)
    return directory


def _staging_prefix(directory: Path) -> str:
    return f".{directory.name}.partial-"


@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on a file beside `directory`, held while fetching into it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("weights: waiting for another process that is fetching into %s", directory)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install(directory: Path, fetch: Callable[[Path], Path]) -> None:
    """Run `fetch(staging)` (which returns the complete model inside `staging`) and put its result in place
    of `directory`. Staging directories left by killed fetches are removed first (the lock is held, so no
    other process is writing to one); this one is removed whatever happens."""
    parent = directory.parent
    for stale in parent.glob(_staging_prefix(directory) + "*"):
        logger.info("weights: removing %s, left by an interrupted fetch", stale)
        shutil.rmtree(stale, ignore_errors=True)
    staging = parent / f"{_staging_prefix(directory)}{os.getpid()}-{time.time_ns()}"
    try:
        model = fetch(staging)
        _put_in_place(model, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _put_in_place(model: Path, directory: Path) -> None:
    """Rename the complete `model` to `directory`; an empty directory there is removed, an incomplete one
    moved aside (it may hold someone's files)."""
    if directory.is_dir() and not directory.is_symlink() and not any(directory.iterdir()):
        try:
            directory.rmdir()
        except OSError as e:
            raise WeightsError(
                f"could not replace the empty {directory} by the fetched weights ({e}); if it is a mount point, "
                "mount its parent directory instead"
            ) from e
    elif directory.exists() or directory.is_symlink():
        aside = directory.with_name(f".{directory.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            directory.rename(aside)
        except OSError as e:
            raise WeightsError(
                f"{directory} is incomplete and could not be moved aside for the fetched weights ({e}); "
                "remove it, or if it is a mount point, mount its parent directory instead"
            ) from e
        logger.warning("weights: moved the incomplete %s aside to %s (remove it to free the space)", directory, aside)
    model.rename(directory)


def _download_from_hub(directory: Path, token: str) -> None:
    """snapshot_download into a fixed staging directory (so a killed download resumes there), then rename."""
    from huggingface_hub import snapshot_download

    staging = directory.with_name(f".{directory.name}.hub-download")
    logger.info("weights: downloading %s to %s", HUB_REPO, staging)
    try:
        snapshot_download(HUB_REPO, local_dir=staging, allow_patterns=HUB_PATTERNS, token=token)
    except Exception as e:  # the hub client raises many types; all mean "no weights"
        raise WeightsError(f"could not download {HUB_REPO} to {staging}: {e}") from e
    missing = weight_archives.missing_entries(staging)
    if missing:
        raise WeightsError(f"the download of {HUB_REPO} to {staging} is incomplete: missing {', '.join(missing)}")
    _put_in_place(staging, directory)
