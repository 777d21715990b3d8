"""Pack a diffusers-layout FLUX.1 Kontext [dev] directory into plain .tar archives for FLUX_WEIGHTS_URL.

    script/pack-weights weights/FLUX.1-Kontext-dev out/weight-archives [--max-part-size 10GB]
                        [--compile-cache weights/compile-cache] [--name flux-kontext-dev]
                        [--no-safety-checker]

Upload the archives anywhere the server can GET them (a bucket, signed URLs are fine) and set
FLUX_WEIGHTS_URL to their URLs, separated by commas. Every part must be listed: setup checks each part's
manifest and refuses an incomplete set. The safety checker's folders are packed with the model (fetched from
the hub into the model directory first where missing), so that a cold boot reads nothing from the hub;
--no-safety-checker leaves them out, for a server run with FLUX_SAFETY_CHECKER=off. The directory's own
compile-cache/ (compile artifacts made on a GPU) is packed like any other folder; --compile-cache adds
artifacts kept elsewhere under compile-cache/.

The archive format is what flux/weight_archives.py (the server's side: fetch, extract, verify) reads: plain tar,
whole files, and last in each archive a manifest of its files and sizes and the number of parts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, not as a module

from flux import safety  # noqa: E402
from flux.errors import WeightsError  # noqa: E402
from flux.weight_archives import (  # noqa: E402
    COMPILE_CACHE,
    MANIFEST_DIR,
    MANIFEST_FORMAT,
    MODEL_INDEX,
    missing_entries,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedArchive:
    path: Path
    files: int
    bytes: int  # the archive's size


def _pack_listing(source: Path, compile_cache: Path | None, skip: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(name in the archive, file on disk): every file under `source` except hidden ones (the hub client's
    .cache/, .gitattributes) and the top-level folders in `skip`, plus `compile_cache`'s files under
    compile-cache/."""
    entries: dict[str, Path] = {}
    roots = [(source, PurePosixPath())]
    if compile_cache is not None:
        roots.append((compile_cache, PurePosixPath(COMPILE_CACHE)))
    for root, prefix in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            top = dirpath == str(root) and root == source
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in skip))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                path = Path(dirpath) / filename
                if path.is_symlink() and not path.resolve().is_file():
                    raise WeightsError(f"{path} is a dangling link")
                name = str(prefix / PurePosixPath(Path(dirpath).relative_to(root).as_posix()) / filename)
                if name in entries:
                    raise WeightsError(f"{name} is both in {source} and in {compile_cache}")
                entries[name] = path
    # model_index.json first, so that a listing of the first part shows what the pack is.
    return sorted(entries.items(), key=lambda kv: (kv[0] != MODEL_INDEX, kv[0]))


def plan_parts(sizes: list[tuple[str, int]], max_part_bytes: int | None) -> list[list[tuple[str, int]]]:
    """Split (name, size) into parts of at most `max_part_bytes` of file data, in order; a file larger than
    the limit gets a part of its own. None: one part."""
    if max_part_bytes is None:
        return [list(sizes)]
    parts: list[list[tuple[str, int]]] = [[]]
    total = 0
    for name, size in sizes:
        if parts[-1] and total + size > max_part_bytes:
            parts.append([])
            total = 0
        parts[-1].append((name, size))
        total += size
    return parts


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Normalised metadata: the same files give the same archive bytes, and nothing about the packing
    # machine (owner, times) ships.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(
    source: Path,
    out_dir: Path,
    name: str = "flux-kontext-dev",
    max_part_bytes: int | None = None,
    compile_cache: Path | None = None,
    safety_checker: bool = True,
    download: safety.Downloader = safety.hub_download,
) -> list[PackedArchive]:
    """Pack the diffusers-layout directory `source` into `out_dir/NAME.tar`, or NAME-I-of-N.tar when split.

    With `safety_checker` (the default) the checker's folders go in too, fetched into `source` first with
    `download` (the hub) where missing, so that setup reads nothing from the hub; without it they are left
    out (for a server run with FLUX_SAFETY_CHECKER=off). `source`'s own compile-cache/ folder goes in like
    any other; `compile_cache` adds artifacts kept elsewhere under compile-cache/. Each archive is written to
    a .partial file and renamed when whole.
    """
    source, out_dir = Path(source), Path(out_dir)
    missing = missing_entries(source)
    if missing:
        raise WeightsError(f"{source} is not a complete model directory: missing {', '.join(missing)}")
    if compile_cache is not None and not Path(compile_cache).is_dir():
        raise WeightsError(f"compile cache {compile_cache} is not a directory")
    if safety_checker:
        safety.ensure_weights(source, download)
    skip = () if safety_checker else safety.CHECKER_FOLDERS
    listing = _pack_listing(source, Path(compile_cache) if compile_cache is not None else None, skip)
    sizes = [(arcname, path.stat().st_size) for arcname, path in listing]
    paths = dict(listing)
    parts = plan_parts(sizes, max_part_bytes)
    # The pack's identity: its files, their sizes and how they are split. Two packs of the same files agree.
    pack_id = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    archives = []
    for number, part in enumerate(parts, 1):
        filename = f"{name}.tar" if len(parts) == 1 else f"{name}-{number}-of-{len(parts)}.tar"
        target = out_dir / filename
        partial = target.with_name(target.name + ".partial")
        manifest = {
            "format": MANIFEST_FORMAT,
            "pack": pack_id,
            "part": number,
            "parts": len(parts),
            "files": dict(part),
        }
        manifest_bytes = (json.dumps(manifest, indent=1) + "\n").encode()
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for arcname, size in part:
                with open(paths[arcname], "rb") as f:
                    tar.addfile(_tarinfo(arcname, size), f)
            # Last member: present only if everything before it arrived.
            manifest_name = f"{MANIFEST_DIR}/part-{number:03d}.json"
            tar.addfile(_tarinfo(manifest_name, len(manifest_bytes)), _BytesReader(manifest_bytes))
        os.replace(partial, target)
        archives.append(PackedArchive(target, len(part), target.stat().st_size))
        logger.info("packed %s: %d files, %.2f GB", target, len(part), target.stat().st_size / 1e9)
    return archives


class _BytesReader:
    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10GB, 500MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the model directory (model_index.json and component folders)")
    parser.add_argument("out", type=Path, help="where to write the archives (created if missing)")
    parser.add_argument("--name", default="flux-kontext-dev", help="archive name (default: flux-kontext-dev)")
    parser.add_argument(
        "--max-part-size",
        type=parse_size,
        default=None,
        help="split into parts of at most this much file data (whole files; default: one archive)",
    )
    parser.add_argument("--compile-cache", type=Path, default=None, help="also pack this folder as compile-cache/")
    parser.add_argument(
        "--no-safety-checker",
        action="store_true",
        help="leave the safety checker's folders out (for a server run with FLUX_SAFETY_CHECKER=off)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        archives = pack(
            args.source,
            args.out,
            args.name,
            args.max_part_size,
            args.compile_cache,
            safety_checker=not args.no_safety_checker,
        )
    except (WeightsError, OSError) as e:
        hint = " (or pack with --no-safety-checker)" if "safety checker" in str(e) else ""
        print(f"pack-weights: {e}{hint}", file=sys.stderr)
        return 1
    total = sum(a.bytes for a in archives)
    print(f"{len(archives)} archive(s), {total / 1e9:.2f} GB:")
    for archive in archives:
        print(f"  {archive.path}  ({archive.files} files, {archive.bytes / 1e9:.2f} GB)")
    names = ",".join(f"https://HOST/PATH/{a.path.name}" for a in archives)
    print(f"upload them, then set FLUX_WEIGHTS_URL={names}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
