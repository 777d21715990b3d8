"""Input files given as URLs or data URIs: fetched with a total deadline and a size cap.

Cog 0.23 fetches an http(s) input with `requests.get(url, stream=True, timeout=10)` and copies
the whole body to a temporary file: the timeout is per read, so a server that sends one byte every
few seconds holds the prediction slot forever, and the body has no size limit. A failed fetch
also leaves its empty temporary file behind. `limit_cog_downloads` replaces that step for this
process with `fetch` below: a deadline for the whole transfer, a cap on its size, and no partial
file left on any failure. It also names the input when a data URI's base64 cannot be decoded.
"""

from __future__ import annotations

import binascii
import os
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

import requests
import urllib3

from flux.errors import InvalidInputError

MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024
"""Largest input file accepted from a URL or a data URI (100 MiB)."""

DOWNLOAD_DEADLINE_S = 60.0
"""Most seconds an input URL may take to arrive in full, from connecting to the last byte."""

READ_TIMEOUT_S = 5.0
"""Seconds a single read of an input URL may wait for data."""

_CHUNK = 1 << 16


@dataclass(frozen=True)
class DownloadLimits:
    max_bytes: int = MAX_DOWNLOAD_BYTES
    deadline_s: float = DOWNLOAD_DEADLINE_S

    @classmethod
    def from_env(cls) -> DownloadLimits:
        """Limits from FLUX_MAX_DOWNLOAD_BYTES / FLUX_DOWNLOAD_DEADLINE_S, else the defaults."""
        return cls(
            max_bytes=int(os.environ.get("FLUX_MAX_DOWNLOAD_BYTES", MAX_DOWNLOAD_BYTES)),
            deadline_s=float(os.environ.get("FLUX_DOWNLOAD_DEADLINE_S", DOWNLOAD_DEADLINE_S)),
        )


def fetch(url: str, dest: BinaryIO, name: str, limits: DownloadLimits) -> int:
    """Stream `url` into `dest`; returns the byte count.

    Raises InvalidInputError naming `name` when the URL cannot be fetched, answers with an error
    status, is larger than `limits.max_bytes`, or has not arrived in full within
    `limits.deadline_s`. The deadline is checked after every read, and a read that receives
    nothing gives up after READ_TIMEOUT_S, so a stalled or dripping server is cut off at most
    that long after the deadline.
    """
    start = time.monotonic()
    host = urllib.parse.urlsplit(url).netloc or "the URL"
    too_slow = InvalidInputError(
        name, f"could not be downloaded from {host}: it took longer than {limits.deadline_s:g} s"
    )
    too_large = InvalidInputError(
        name, f"could not be downloaded from {host}: it is larger than {limits.max_bytes:,} bytes"
    )
    read_timeout = min(READ_TIMEOUT_S, limits.deadline_s)
    try:
        with requests.get(url, stream=True, timeout=(read_timeout, read_timeout)) as resp:
            if resp.status_code >= 400:
                raise InvalidInputError(
                    name, f"could not be downloaded from {host}: HTTP {resp.status_code} {resp.reason}"
                )
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise too_large
            total = 0
            while True:
                # read1 returns whatever one socket read brings, so a server that drips a byte at
                # a time cannot keep a read (and the deadline check) waiting.
                chunk = resp.raw.read1(_CHUNK, decode_content=True)
                if not chunk:
                    return total
                total += len(chunk)
                if total > limits.max_bytes:
                    raise too_large
                dest.write(chunk)
                if time.monotonic() - start > limits.deadline_s:
                    raise too_slow
    except (requests.Timeout, urllib3.exceptions.TimeoutError) as e:
        raise InvalidInputError(name, f"could not be downloaded from {host}: no answer for {read_timeout:g} s") from e
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        raise InvalidInputError(name, f"could not be downloaded from {host} ({e.__class__.__name__})") from e


def copy_limited(src: BinaryIO, dest: BinaryIO, name: str, limits: DownloadLimits) -> int:
    """Copy an already-decoded input (a data URI's bytes) into `dest`, refusing more than the cap."""
    total = 0
    while chunk := src.read(_CHUNK):
        total += len(chunk)
        if total > limits.max_bytes:
            raise InvalidInputError(name, f"is larger than {limits.max_bytes:,} bytes")
        dest.write(chunk)
    return total


def limit_cog_downloads(name: str, limits: DownloadLimits | None = None) -> None:
    """Make Cog fetch file inputs of this process with `fetch`/`copy_limited` under `limits`.

    `name` is the input the errors name (this predictor has one file input). Cog hands the
    predictor a `cog.types.URLPath` for a URL or data URI and calls its `convert()` to download
    it before `run()`; that method is replaced here. Decoding a data URI happens earlier, when the
    request is validated: errors there are re-raised naming the input.
    """
    import cog.types

    limits = limits or DownloadLimits.from_env()
    url_path, cog_path = cog.types.URLPath, cog.types.Path
    if not (callable(getattr(url_path, "convert", None)) and hasattr(cog_path, "validate")):
        raise RuntimeError("this cog version has no URLPath.convert / Path.validate to limit downloads with")
    original_validate = cog_path.validate.__func__

    def convert(self: cog.types.URLPath) -> cog.types.Path:
        if self._path is None:
            fd, tmp = tempfile.mkstemp(suffix=self.filename)
            try:
                with os.fdopen(fd, "wb") as dest:
                    if urllib.parse.urlsplit(self.source).scheme in ("http", "https"):
                        fetch(self.source, dest, name, limits)
                    else:
                        copy_limited(self.fileobj, dest, name, limits)
            except BaseException:
                os.unlink(tmp)
                raise
            self._path = cog_path(tmp)
        return self._path

    def validate(cls: type, value: object) -> object:
        try:
            return original_validate(cls, value)
        except (binascii.Error, ValueError, OSError) as e:
            if isinstance(value, str) and value.startswith("data:"):
                raise InvalidInputError(name, f"could not be read: the data URI is not valid base64 ({e})") from e
            raise

    url_path.convert = convert
    cog_path.validate = classmethod(validate)
