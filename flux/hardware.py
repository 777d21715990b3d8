"""The device the server runs on, and the runtime facts setup logs (torch, CUDA, driver, GPU).

FLUX.1 Kontext [dev] needs a CUDA GPU: on the CPU the model loads in float32 (about 67 GB of memory) and
one edit takes many minutes. A container that does not see its GPU (started without `--gpus`, or on a
host whose NVIDIA driver is older than torch's CUDA build needs) must fail setup saying so, not fall back
to the CPU quietly. The CPU is allowed for test models (the RANDOM_WEIGHTS marker that flux.tiny writes)
and when FLUX_DEVICE=cpu asks for it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from flux.model import RANDOM_WEIGHTS_MARKER

logger = logging.getLogger(__name__)

ENV_DEVICE = "FLUX_DEVICE"
DEVICES = ("cuda", "cpu")


class DeviceError(RuntimeError):
    """No usable device for the server: the message says what torch saw and what to do."""


def nvidia_driver_version() -> str | None:
    """The host's NVIDIA kernel driver version (e.g. "570.86.15"), or None when there is none to see."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.split()
            return out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def describe_runtime(cuda_available: bool) -> str:
    """One line: torch build, its CUDA, the NVIDIA driver and the GPU (or that there is none)."""
    cuda = torch.version.cuda
    build = f"torch {torch.__version__} ({f'CUDA {cuda}' if cuda else 'a CPU build'})"
    driver = nvidia_driver_version()
    parts = [build, f"NVIDIA driver {driver}" if driver else "no NVIDIA driver found"]
    if cuda_available:
        props = torch.cuda.get_device_properties(0)
        parts.append(
            f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}"
            f"{f', {torch.cuda.device_count()} visible' if torch.cuda.device_count() > 1 else ''})"
        )
    else:
        parts.append("no GPU visible to torch")
    return ", ".join(parts)


def serving_device(weights_dir: str | Path) -> str:
    """The device to serve on: "cuda" when torch sees a GPU; "cpu" when FLUX_DEVICE=cpu, or when there is
    no GPU and the weights already in `weights_dir` are a test model (setup asks before fetching anything, so
    weights still to be fetched count as real ones). Otherwise raises DeviceError saying what torch saw. Logs
    the runtime (torch, CUDA, driver, GPU) either way."""
    requested = os.environ.get(ENV_DEVICE, "").strip().lower() or None
    if requested is not None and requested not in DEVICES:
        raise DeviceError(f"FLUX_DEVICE must be one of {', '.join(DEVICES)} (or unset), not {requested!r}")
    # torch explains a failed CUDA initialisation (e.g. a driver too old) in a warning: keep it for the error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    runtime = describe_runtime(available)
    logger.info("runtime: %s", runtime)
    if requested == "cpu":
        if available:
            logger.warning("FLUX_DEVICE=cpu: serving on the CPU although a GPU is visible")
        return "cpu"
    if available:
        return "cuda"
    test_model = (Path(weights_dir) / RANDOM_WEIGHTS_MARKER).exists()
    if test_model and requested is None:
        logger.warning("no GPU: serving the test model at %s on the CPU", weights_dir)
        return "cpu"
    said = " ".join(str(w.message).strip() for w in caught if "cuda" in str(w.message).lower())
    raise DeviceError(
        f"no CUDA GPU is visible to torch ({runtime}{'; ' + said if said else ''}). "
        "FLUX.1 Kontext [dev] needs one: its bfloat16 weights alone are about 34 GB. Start the container with "
        "a GPU (`docker run --gpus all`, or a GPU hardware type on Replicate) on a host whose NVIDIA driver "
        f"supports CUDA {torch.version.cuda or '12'}, or set {ENV_DEVICE}=cpu to run on the CPU anyway "
        "(float32, about 67 GB of memory, minutes per edit). To try the server without a GPU or weights, serve "
        "the tiny random-weight test model instead: script/serve --tiny."
    )
