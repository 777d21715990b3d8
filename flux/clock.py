"""Wall-clock timing that is honest on a GPU."""

import time

import torch


def now(device: torch.device) -> float:
    """perf_counter() once `device` has finished the work queued so far: CUDA kernels run
    asynchronously, so without the wait a phase would be timed by when it was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
