"""serving.memory: the memory a finished prediction freed goes back to the system."""

from pathlib import Path

import pytest
import torch

from serving import memory


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_freed_heap_memory_is_returned():
    if memory._malloc_trim() is None:
        pytest.skip("the C library is not glibc")
    for _ in range(2):  # the first round's frees raise malloc's mmap threshold: the second round is on the heap
        blocks = [torch.ones(256, 1024) for _ in range(200)]  # 200 MiB in 1 MiB blocks, touched
        pins = [torch.ones(1) for _ in range(200)]  # small blocks after them keep the heap from shrinking itself
        del blocks
    before = rss_mib()
    assert memory.release_free_memory()
    after = rss_mib()
    assert before - after > 100, (before, after)
    del pins
