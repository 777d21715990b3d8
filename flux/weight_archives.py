"""Weight archives: plain .tar files whose root holds a diffusers-layout model (model_index.json and the
component folders), packed by `script/pack-weights` (script/pack_weights.py, which writes the format this
module reads) and fetched at setup from $FLUX_WEIGHTS_URL.

Why tarballs: Replicate gives a model no hub token, and its own FLUX models fetch tarballs at setup with
`pget -x URL DEST` (parallel ranged download, extracted while it arrives). Plain tar, not gzip: safetensors
do not compress, and decompression would be the bottleneck.

What makes a fetch trustworthy:
- Every archive script/pack-weights packs ends with a manifest, `.flux-archive/part-NNN.json`, listing its files and
  their sizes and how many parts the pack has. It is the last member, so an archive cut short anywhere lacks
  it; after extraction every part must be present and every listed file whole.
- The Python extractor writes only regular files and folders inside the destination: absolute names, `..`,
  links and special files are refused, and the archive must end with tar's end-of-archive marker (Python's
  tarfile silently stops at a truncated or garbled header). After pget, the tree is checked for links.
- Archives are extracted into a staging directory that the caller renames into place only when complete
  (flux.weights), so a fetch killed midway leaves nothing that looks like weights.

Errors name the URL without its query string or credentials (signed URLs carry secrets there).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from flux.errors import WeightsError

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
MANIFEST_DIR = ".flux-archive"
MANIFEST_FORMAT = 1
COMPILE_CACHE = "compile-cache"  # compile artifacts shipped beside the weights (flux.accelerate's files)
_CHUNK = 1 << 20
# Seconds allowed to connect, and between two reads of an archive, before the fetch counts as stalled.
CONNECT_TIMEOUT_S = 30
READ_TIMEOUT_S = 120
_PROGRESS_EVERY_S = 15.0


# ---- what a complete weights directory is ---------------------------------------------------------------


def missing_entries(directory: Path, verify_cache: bool = False) -> list[str]:
    """What `directory` lacks to be a complete diffusers-layout model, [] when complete.

    Complete means: model_index.json is readable, every component it names is a folder, and, where the
    directory came from packed archives, every file their manifests list is there at its size. Cheap (no
    file is read but the JSON), so setup can decide whether to fetch. The strict loader checks the rest.
    Compile artifacts (compile-cache/) are checked only when `verify_cache` (right after a fetch): setup
    rewrites them after its warm-up, and a cache that changed must not make the weights look incomplete.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} (no such directory)"]
    try:
        index = json.loads((directory / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        return [MODEL_INDEX]
    if not isinstance(index, dict):
        return [MODEL_INDEX]
    missing = [
        f"{name}/"
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value
        and value[0] is not None
        and not (directory / name).is_dir()
    ]
    manifests = _read_manifests(directory)
    if manifests:
        missing += _check_manifests(directory, manifests, verify_cache)
    return missing


def _read_manifests(directory: Path) -> list[dict]:
    manifests = []
    for path in sorted((directory / MANIFEST_DIR).glob("part-*.json")):
        try:
            manifests.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            manifests.append({"unreadable": path.name})
    return manifests


def _check_manifests(directory: Path, manifests: list[dict], verify_cache: bool) -> list[str]:
    """Problems with a packed directory: parts missing, from two packs, or files missing or of another size."""
    problems = []
    if any("unreadable" in m for m in manifests):
        return [f"{MANIFEST_DIR}/{m['unreadable']} (unreadable)" for m in manifests if "unreadable" in m]
    packs = {m.get("pack") for m in manifests}
    if len(packs) != 1:
        return [f"{MANIFEST_DIR}/ (parts of {len(packs)} different packs)"]
    parts = manifests[0].get("parts")
    have = sorted(m.get("part") for m in manifests)
    if not isinstance(parts, int) or have != list(range(1, parts + 1)):
        absent = [str(i) for i in range(1, (parts or 0) + 1) if i not in have]
        problems.append(f"archive part(s) {', '.join(absent) or '?'} of {parts}")
    for manifest in manifests:
        for name, size in manifest.get("files", {}).items():
            if not verify_cache and name.startswith(COMPILE_CACHE + "/"):
                continue
            path = directory / name
            try:
                actual = path.stat().st_size
            except OSError:
                problems.append(name)
                continue
            if actual != size:
                problems.append(f"{name} ({actual} of {size} bytes)")
    return problems


# ---- fetching -------------------------------------------------------------------------------------------


def redact(url: str) -> str:
    """The URL as errors and logs show it: scheme, host and path, without credentials or query string."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    shown = f"{parts.scheme}://{host}{parts.path}"
    return shown + ("?…" if parts.query else "")


def check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WeightsError(f"FLUX_WEIGHTS_URL entry {redact(url)!r} is not an http(s) URL")


def fetch_archives(urls: list[str], staging: Path, pget: str | None = None) -> Path:
    """Fetch and extract each archive into `staging` (which must not exist) and return the directory that
    holds the merged, verified model (inside `staging`). With `pget` (a path to the pget binary) each archive
    is fetched and extracted by `pget -x`; otherwise by a streaming fetch in Python.

    Raises WeightsError naming the URL when an archive is missing, truncated, corrupt or unsafe, or when
    the archives together are not a complete model.
    """
    staging = Path(staging)
    staging.mkdir()
    model = staging / "model"
    model.mkdir()
    for number, url in enumerate(urls, 1):
        shown = redact(url)
        part_dir = staging / f"archive-{number}"
        t0 = time.perf_counter()
        if pget:
            _fetch_with_pget(pget, url, part_dir)
            _check_extracted_tree(part_dir, shown)
        else:
            part_dir.mkdir()
            _fetch_with_python(url, part_dir)
        size = _tree_bytes(part_dir)
        seconds = time.perf_counter() - t0
        logger.info(
            "fetched %s: %.2f GB in %.1f s (%.0f MB/s, %s)",
            shown,
            size / 1e9,
            seconds,
            size / 1e6 / max(seconds, 1e-9),
            "pget" if pget else "python",
        )
        _merge_into(part_dir, model, shown)
        part_dir.rmdir()
    missing = missing_entries(model, verify_cache=True)
    if missing:
        which = ", ".join(redact(u) for u in urls)
        raise WeightsError(f"the archives at {which} are not a complete model: missing {', '.join(missing)}")
    return model


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _merge_into(src: Path, dst: Path, shown: str, prefix: str = "") -> None:
    """Move src's tree into dst. Archives may split a folder between them; the same file twice is an error."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if not target.exists():
            entry.rename(target)
        elif entry.is_dir() and target.is_dir():
            _merge_into(entry, target, shown, f"{prefix}{entry.name}/")
            entry.rmdir()
        else:
            raise WeightsError(f"{shown} holds {prefix}{entry.name}, which an earlier archive also holds")


def _fetch_with_pget(pget: str, url: str, dest: Path) -> None:
    """`pget -x URL DEST` (pget creates DEST itself and refuses an existing one). Its output goes to the log as it
    comes, with the URL redacted (pget quotes it whole); the last lines go into the error if it fails."""
    shown = redact(url)
    tail: collections.deque[str] = collections.deque(maxlen=5)
    try:
        proc = subprocess.Popen(
            [pget, "-x", url, str(dest)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as e:
        raise WeightsError(f"could not run {pget} to fetch {shown}: {e}") from e
    with proc:
        for line in proc.stdout:
            line = line.rstrip().replace(url, shown)
            if line:
                tail.append(line)
                logger.info("pget: %s", line)
    if proc.returncode != 0:
        raise WeightsError(f"could not fetch {shown} with pget (exit {proc.returncode}): {' | '.join(tail)}")
    if not dest.is_dir():
        raise WeightsError(f"pget fetched {shown} but extracted nothing (is it a tar archive?)")


def _check_extracted_tree(root: Path, shown: str) -> None:
    """After pget: refuse links (a symlink can point anywhere; a file with several hard links is linked to
    something outside the tree or inside it) and anything but files and folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(root)
            if path.is_symlink():
                raise WeightsError(f"{shown}: {rel} is a link; weight archives hold only files and folders")
            if path.is_file() and st.st_nlink > 1:
                raise WeightsError(f"{shown}: {rel} is a hard link; weight archives hold only files and folders")
            if not (path.is_file() or path.is_dir()):
                raise WeightsError(f"{shown}: {rel} is not a regular file or folder")


def _fetch_with_python(url: str, dest: Path) -> None:
    import requests

    shown = redact(url)
    try:
        # identity: a server must not compress the stream (sizes and the end-of-archive check are on raw bytes)
        response = requests.get(
            url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), headers={"Accept-Encoding": "identity"}
        )
    except requests.RequestException as e:
        raise WeightsError(f"could not fetch {shown}: {type(e).__name__}: {_redacted(e, url)}") from e
    with response:
        if response.status_code != 200:
            raise WeightsError(f"could not fetch {shown}: HTTP {response.status_code} {response.reason}")
        declared = response.headers.get("Content-Length")
        total = int(declared) if declared and declared.isdigit() else None
        if total is not None:
            free = shutil.disk_usage(dest).free
            if total > free:
                raise WeightsError(f"{shown} is {total / 1e9:.1f} GB but {dest} has {free / 1e9:.1f} GB free")
        progress = _Progress(shown, total)
        try:
            extract_tar_stream(_RawReader(response.raw, progress), dest, shown)
        except WeightsError:
            raise
        except Exception as e:  # the HTTP stack raises many types mid-stream (cut connection, timeout)
            raise WeightsError(
                f"could not fetch {shown}: {type(e).__name__}: {_redacted(e, url)} "
                f"after {progress.done / 1e9:.2f} GB" + (f" of {total / 1e9:.2f} GB" if total else "")
            ) from e


def _redacted(error: BaseException, url: str) -> str:
    return str(error).replace(url, redact(url))


class _Progress:
    def __init__(self, shown: str, total: int | None):
        self.shown, self.total, self.done = shown, total, 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            of = f" of {self.total / 1e9:.2f}" if self.total else ""
            rate = self.done / 1e6 / (now - self.t0)
            logger.info("fetching %s: %.2f%s GB (%.0f MB/s)", self.shown, self.done / 1e9, of, rate)


class _RawReader:
    """A file-like view of an HTTP body that reports progress. urllib3 raises if the body ends before its
    Content-Length."""

    def __init__(self, raw, progress: _Progress):
        self._raw, self._progress = raw, progress

    def read(self, n: int = -1) -> bytes:
        chunk = self._raw.read(_CHUNK if n is None or n < 0 else n)
        self._progress.update(len(chunk))
        return chunk


class _TailReader:
    """Reads from `source`, counting bytes and keeping the last few records, so that the bytes after the last
    member can be checked once tarfile stops reading."""

    KEEP = 1 << 16  # more than tarfile's read-ahead (one 10 KiB record)

    def __init__(self, source: BinaryIO | _RawReader):
        self._source = source
        self.position = 0
        self._tail = bytearray()

    def read(self, n: int = -1) -> bytes:
        chunk = self._source.read(n)
        self.position += len(chunk)
        self._tail += chunk[-self.KEEP :]
        del self._tail[: max(0, len(self._tail) - self.KEEP)]
        return chunk

    def since(self, offset: int) -> bytes:
        """The bytes read from `offset` on (offset must be within the kept tail)."""
        start = self.position - len(self._tail)
        assert offset >= start, (offset, start)
        return bytes(self._tail[offset - start :])


def _member_path(name: str, shown: str) -> PurePosixPath:
    """The member's path relative to the destination ("./a" is "a"; "." is the root itself)."""
    path = PurePosixPath(name)  # drops "." segments
    if path.is_absolute() or ".." in path.parts or "\\" in name or "\0" in name:
        raise WeightsError(f"{shown}: refusing archive member {name!r} (an absolute name or one with '..')")
    return path


def extract_tar_stream(source: BinaryIO | _RawReader, dest: Path, shown: str) -> int:
    """Extract the plain tar read from `source` into the existing directory `dest`; returns the bytes of
    file data written. Only regular files and folders; names may not leave `dest`; a file may not appear
    twice; the archive must end with its end-of-archive marker (two zero blocks), followed only by zeros.
    """
    reader = _TailReader(source)
    written = 0
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                rel = _member_path(member.name, shown)
                target = dest.joinpath(*rel.parts)
                if not rel.parts and not member.isdir():
                    raise WeightsError(f"{shown}: refusing archive member {member.name!r} (no name)")
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    kind = "link" if (member.issym() or member.islnk()) else "special file"
                    raise WeightsError(
                        f"{shown}: archive member {member.name!r} is a {kind}; weight archives hold only files "
                        "and folders"
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                data = tar.extractfile(member)
                try:
                    with open(target, "xb") as out:
                        shutil.copyfileobj(data, out, _CHUNK)
                except FileExistsError:
                    raise WeightsError(f"{shown}: archive member {member.name!r} appears twice") from None
                written += member.size
            end = tar.offset  # where tarfile looked for the next header and stopped
    except tarfile.TarError as e:
        raise WeightsError(f"{shown} is not a whole tar archive: {e}") from e
    _check_end_of_archive(reader, end, shown)
    return written


def _check_end_of_archive(reader: _TailReader, end: int, shown: str) -> None:
    """tarfile ends its loop quietly at a missing, truncated or garbled header; a whole archive has two zero
    blocks there. Read past them and check the rest of the stream is zero padding."""
    while reader.position < end + 2 * tarfile.BLOCKSIZE:
        if not reader.read(_CHUNK):
            raise WeightsError(
                f"{shown} is cut short: it ends after {reader.position} bytes, without tar's end-of-archive marker"
            )
    if reader.since(end).strip(b"\0"):
        raise WeightsError(f"{shown} is corrupt: unreadable data at byte {end} where the next member should be")
    while chunk := reader.read(_CHUNK):
        if chunk.strip(b"\0"):
            raise WeightsError(f"{shown} is corrupt: data after its end-of-archive marker")


def which_pget() -> str | None:
    """The pget binary on PATH (installed in the container by cog.yaml), or None."""
    return shutil.which("pget")
