"""serving.memory: the memory a finished prediction freed goes back to the system."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serving import memory

ROOT = Path(__file__).resolve().parent.parent

# In a fresh process: how much malloc hands back depends on where it put the blocks (heap or mmap), which
# depends on what the process allocated and freed before, so other tests must not share its allocator.
FREE_AND_TRIM = textwrap.dedent(
    """
    from pathlib import Path
    import torch
    from serving import memory

    def rss_mib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    for _ in range(2):  # the first round's frees raise malloc's mmap threshold: the second round is on the heap
        blocks = [torch.ones(256, 1024) for _ in range(200)]  # 200 MiB in 1 MiB blocks, touched
        pins = [torch.ones(1) for _ in range(200)]  # small blocks after them keep the heap from shrinking itself
        del blocks
    before = rss_mib()
    released = memory.release_free_memory()
    print(released, before, rss_mib())
    """
)


def test_freed_heap_memory_is_returned():
    if memory._malloc_trim() is None:
        pytest.skip("the C library is not glibc")
    out = subprocess.run([sys.executable, "-c", FREE_AND_TRIM], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    released, before, after = out.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 100, (before, after)
