"""Keep a long-running server's resident memory flat.

glibc's malloc serves large blocks (tensors, decoded images) with mmap only up to a threshold that it
raises each time such a block is freed; after a few predictions they come from the heap instead, and
freed heap memory stays with the process for reuse. Resident memory then wanders by tens to hundreds
of MiB from one prediction to the next, and settles higher whenever the heap fragments.
`release_free_memory()` after each prediction hands the free pages back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        logger.info("the C library has no malloc_trim (not glibc): free memory is left to it")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the pages malloc holds free to the system (glibc's malloc_trim). Returns whether any were;
    False also where the C library is not glibc (musl, macOS)."""
    trim = _malloc_trim()
    return bool(trim and trim(0))
