"""Pack a diffusers-layout FLUX.1 Kontext [dev] directory into plain .tar archives for FLUX_WEIGHTS_URL.

    script/pack-weights weights/FLUX.1-Kontext-dev out/weight-archives [--max-part-size 10GB]
                        [--compile-cache weights/compile-cache] [--name flux-kontext-dev]

Upload the archives anywhere the server can GET them (a bucket, signed URLs are fine) and set
FLUX_WEIGHTS_URL to their URLs, separated by spaces. Every part must be listed: setup checks each part's
manifest and refuses an incomplete set. The directory's own compile-cache/ (compile artifacts made on a
GPU) is packed like any other folder; --compile-cache adds artifacts kept elsewhere under compile-cache/.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, not as a module

from flux.errors import WeightsError  # noqa: E402
from flux.weight_archives import pack  # noqa: E402

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        archives = pack(args.source, args.out, args.name, args.max_part_size, args.compile_cache)
    except (WeightsError, OSError) as e:
        print(f"pack-weights: {e}", file=sys.stderr)
        return 1
    total = sum(a.bytes for a in archives)
    print(f"{len(archives)} archive(s), {total / 1e9:.2f} GB:")
    for archive in archives:
        print(f"  {archive.path}  ({archive.files} files, {archive.bytes / 1e9:.2f} GB)")
    names = " ".join(f"https://HOST/PATH/{a.path.name}" for a in archives)
    print(f'upload them, then set FLUX_WEIGHTS_URL="{names}"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
