"""Where a request's `lora_weights` come from: a URL, a data URI or a hub repository, kept in a bounded cache.

A LoRA is fetched once and kept on disk, so a client that sends the same URL again does not wait for it
again. The cache is bounded in bytes ($FLUX_LORA_CACHE_BYTES); when a new file would pass the bound, the
files used least recently go first, never one of the same request's files: a request whose files cannot all fit
the bound together is refused, saying so. Files appear in the cache complete or not at all, each with the sha256
of its bytes, computed while it is written: the LoRA slot knows a LoRA by it (flux.lora), without reading the file
on every request. The cache is the only writer of its directory.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from flux.errors import InvalidInputError
from flux.lora import MAX_LORAS, file_sha256
from serving import downloads

logger = logging.getLogger(__name__)

NAME = "lora_weights"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[\w./-]+\.safetensors))?$")
DEFAULT_MAX_BYTES = 2 * 1024**3  # a rank-128 FLUX.1 LoRA in float32 is about 1.3 GB
DEFAULT_CACHE_BYTES = MAX_LORAS * DEFAULT_MAX_BYTES  # a request of the largest files fits
DEFAULT_DEADLINE_S = 300.0


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file in the cache and the sha256 of its bytes (hex)."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class LoraCache:
    directory: Path
    max_total_bytes: int = DEFAULT_CACHE_BYTES
    limits: downloads.DownloadLimits = downloads.DownloadLimits(DEFAULT_MAX_BYTES, DEFAULT_DEADLINE_S)
    # path -> the sha256 of the file there: set when the cache writes a file, dropped when it removes one; a file
    # from before this process started is read once
    _digests: dict[Path, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_env(cls) -> LoraCache:
        """$FLUX_LORA_CACHE (default: flux-lora-cache in the temporary directory), $FLUX_LORA_CACHE_BYTES (default:
        room for MAX_LORAS files of the largest size), per file $FLUX_MAX_LORA_BYTES and $FLUX_LORA_DEADLINE_S,
        and the URL rule of the other inputs ($FLUX_ALLOW_PRIVATE_URLS)."""
        directory = os.environ.get("FLUX_LORA_CACHE") or Path(tempfile.gettempdir()) / "flux-lora-cache"
        limits = dataclasses.replace(
            downloads.DownloadLimits.from_env(),  # the URL rule of every input: public hosts only, unless allowed
            max_bytes=int(os.environ.get("FLUX_MAX_LORA_BYTES", DEFAULT_MAX_BYTES)),
            deadline_s=float(os.environ.get("FLUX_LORA_DEADLINE_S", DEFAULT_DEADLINE_S)),
        )
        max_total = int(os.environ.get("FLUX_LORA_CACHE_BYTES", MAX_LORAS * limits.max_bytes))
        if max_total < MAX_LORAS * limits.max_bytes:
            logger.warning(
                "FLUX_LORA_CACHE_BYTES (%s) holds fewer than %d LoRAs of FLUX_MAX_LORA_BYTES (%s): a request with "
                "several large LoRAs may be refused",
                f"{max_total:,}",
                MAX_LORAS,
                f"{limits.max_bytes:,}",
            )
        return cls(Path(directory), max_total, limits)

    def resolve(self, source: str) -> LoraFile:
        """A local .safetensors file for `source`: an http(s) URL, a data URI, or a hub id `owner/name`
        (optionally `owner/name/file.safetensors`). Raises InvalidInputError naming lora_weights."""
        return self.resolve_all([source])[0]

    def resolve_all(self, sources: Sequence[object]) -> tuple[LoraFile, ...]:
        """The files of one request's lora_weights, in order: none of them is removed to make room for another
        (the server runs one prediction at a time: the next one resolves its files after this one's edit has read
        these). Raises InvalidInputError naming lora_weights, and the item when there are several; when the files
        cannot all fit the cache's bound together, naming their sizes and the bound."""
        kept: dict[Path, tuple[int, int]] = {}  # this request's files so far: path -> (item, size)
        files = []
        for i, source in enumerate(sources):
            try:
                if not isinstance(source, str) or not source.strip():
                    raise InvalidInputError(NAME, "is blank: leave lora_weights out (or null) for no LoRA")
                files.append(self._resolve(source, kept, i))
            except _PastTheBound as e:  # about the request's files together, not one item
                raise InvalidInputError(NAME, e.problem) from None
            except InvalidInputError as e:
                raise (e.for_item(i) if len(sources) > 1 else e) from None
        return tuple(files)

    def _resolve(self, source: str, kept: dict[Path, tuple[int, int]], item: int) -> LoraFile:
        source = source.strip()
        scheme = urllib.parse.urlsplit(source).scheme
        if scheme in ("http", "https"):
            return self._cached(source, lambda dest: downloads.fetch(source, dest, NAME, self.limits), kept, item)
        if scheme == "data":
            return self._cached(source, lambda dest: dest.write(_decode_data_uri(source, self.limits)), kept, item)
        if match := HUB_ID.match(source):
            fill = lambda dest: _from_hub(match["repo"], match["file"], dest, self.limits)  # noqa: E731
            return self._cached(source, fill, kept, item)
        raise InvalidInputError(NAME, "must be an http(s) URL, a data URI or a hub id owner/name (.safetensors)")

    def _cached(self, source: str, fill, kept: dict[Path, tuple[int, int]], item: int) -> LoraFile:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{hashlib.sha256(source.encode()).hexdigest()[:32]}.safetensors"
        if path.exists():
            os.utime(path)  # most recently used
            if path not in self._digests:
                self._digests[path] = file_sha256(path)
            kept.setdefault(path, (item, path.stat().st_size))
            logger.info("lora_weights from the cache")
            return LoraFile(path, self._digests[path])
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out:
                dest = _Hashing(out)
                fill(dest)
            size = os.path.getsize(tmp)
            self._make_room(size, kept, item)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._digests[path] = dest.sha256.hexdigest()
        kept[path] = (item, size)
        logger.info("lora_weights fetched: %d bytes", size)
        return LoraFile(path, self._digests[path])

    def _make_room(self, incoming: int, kept: dict[Path, tuple[int, int]], item: int) -> None:
        """Remove the least recently used files, apart from `kept`, until `incoming` more bytes fit the bound;
        _PastTheBound when `kept` and `incoming` alone pass it."""
        items = sorted([*kept.values(), (item, incoming)])
        if sum(size for _, size in items) > self.max_total_bytes:
            raise _PastTheBound(items, self.max_total_bytes)
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        files = [p for p in files if p not in kept]
        while files and total + incoming > self.max_total_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            self._digests.pop(oldest, None)


class _PastTheBound(Exception):
    """A request's files (item, size) that cannot all fit the cache's bound together: `problem` says so."""

    def __init__(self, items: list[tuple[int, int]], bound: int):
        where = f"more than this server's LoRA cache holds (FLUX_LORA_CACHE_BYTES: {bound:,} bytes)"
        if len(items) == 1:
            self.problem = f"takes {items[0][1]:,} bytes, {where}"
        else:
            *first, last = (str(i + 1) for i, _ in items)
            sizes = " + ".join(f"{size:,}" for _, size in items)
            total = sum(size for _, size in items)
            self.problem = f"items {', '.join(first)} and {last} take {sizes} = {total:,} bytes together, {where}"
        super().__init__(self.problem)


class _Hashing:
    """A file being written, and the sha256 of what was written to it so far."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.out.write(data)


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
