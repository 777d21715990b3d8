"""Where a request's `lora_weights` come from: a URL, a data URI or a hub repository, kept in a bounded cache.

A LoRA is fetched once and kept on disk, so a client that sends the same URL again does not wait for it
again. The cache is bounded in bytes ($FLUX_LORA_CACHE_BYTES); when a new file would pass the bound, the
files used least recently go first. Files appear in the cache complete or not at all.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from flux.errors import InvalidInputError
from serving import downloads

logger = logging.getLogger(__name__)

NAME = "lora_weights"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[\w./-]+\.safetensors))?$")
DEFAULT_CACHE_BYTES = 4 * 1024**3
DEFAULT_MAX_BYTES = 2 * 1024**3  # a rank-128 FLUX.1 LoRA in float32 is about 1.3 GB
DEFAULT_DEADLINE_S = 300.0


@dataclass(frozen=True)
class LoraCache:
    directory: Path
    max_total_bytes: int = DEFAULT_CACHE_BYTES
    limits: downloads.DownloadLimits = downloads.DownloadLimits(DEFAULT_MAX_BYTES, DEFAULT_DEADLINE_S)

    @classmethod
    def from_env(cls) -> LoraCache:
        """$FLUX_LORA_CACHE (default: flux-lora-cache in the temporary directory), $FLUX_LORA_CACHE_BYTES,
        per file $FLUX_MAX_LORA_BYTES and $FLUX_LORA_DEADLINE_S, and the URL rule of the other inputs
        ($FLUX_ALLOW_PRIVATE_URLS)."""
        directory = os.environ.get("FLUX_LORA_CACHE") or Path(tempfile.gettempdir()) / "flux-lora-cache"
        limits = dataclasses.replace(
            downloads.DownloadLimits.from_env(),  # the URL rule of every input: public hosts only, unless allowed
            max_bytes=int(os.environ.get("FLUX_MAX_LORA_BYTES", DEFAULT_MAX_BYTES)),
            deadline_s=float(os.environ.get("FLUX_LORA_DEADLINE_S", DEFAULT_DEADLINE_S)),
        )
        return cls(Path(directory), int(os.environ.get("FLUX_LORA_CACHE_BYTES", DEFAULT_CACHE_BYTES)), limits)

    def resolve(self, source: str) -> Path:
        """A local .safetensors file for `source`: an http(s) URL, a data URI, or a hub id `owner/name`
        (optionally `owner/name/file.safetensors`). Raises InvalidInputError naming lora_weights."""
        source = source.strip()
        scheme = urllib.parse.urlsplit(source).scheme
        if scheme in ("http", "https"):
            return self._cached(source, lambda dest: downloads.fetch(source, dest, NAME, self.limits))
        if scheme == "data":
            return self._cached(source, lambda dest: dest.write(_decode_data_uri(source, self.limits)))
        if match := HUB_ID.match(source):
            return self._cached(source, lambda dest: _from_hub(match["repo"], match["file"], dest, self.limits))
        raise InvalidInputError(NAME, "must be an http(s) URL, a data URI or a hub id owner/name (.safetensors)")

    def _cached(self, source: str, fill) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{hashlib.sha256(source.encode()).hexdigest()[:32]}.safetensors"
        if path.exists():
            os.utime(path)  # most recently used
            logger.info("lora_weights from the cache")
            return path
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as dest:
                fill(dest)
            size = os.path.getsize(tmp)
            self._make_room(size)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("lora_weights fetched: %d bytes", size)
        return path

    def _make_room(self, incoming: int) -> None:
        """Remove the least recently used files until `incoming` more bytes fit the bound."""
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total + incoming > self.max_total_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)


def _decode_data_uri(uri: str, limits: downloads.DownloadLimits) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise InvalidInputError(NAME, "data URI must be base64-encoded")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise InvalidInputError(NAME, f"is larger than {limits.max_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(NAME, "could not be read: the data URI is not valid base64") from e


def _from_hub(repo: str, filename: str | None, dest, limits: downloads.DownloadLimits) -> None:
    """Copy the repository's .safetensors file (its only one, or `filename`) into `dest`."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise InvalidInputError(NAME, f"could not be fetched from the hub repository {repo}: this server is offline")
    try:
        if filename is None:
            files = [f for f in HfApi().list_repo_files(repo) if f.endswith(".safetensors")]
            if len(files) != 1:
                found = ", ".join(files[:5]) or "none"
                problem = f"hub repository {repo} must hold one .safetensors file (found {found}): use {repo}/FILE"
                raise InvalidInputError(NAME, problem)
            filename = files[0]
        (info,) = HfApi().get_paths_info(repo, [filename])
        if info.size is not None and info.size > limits.max_bytes:
            raise InvalidInputError(NAME, f"is larger than {limits.max_bytes:,} bytes")
        with tempfile.TemporaryDirectory() as tmp:
            local = hf_hub_download(repo, filename, local_dir=tmp)
            with open(local, "rb") as src:
                while chunk := src.read(1 << 20):
                    dest.write(chunk)
    except InvalidInputError:
        raise
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as e:
        problem = f"could not be fetched from the hub repository {repo} ({type(e).__name__})"
        raise InvalidInputError(NAME, problem) from e
