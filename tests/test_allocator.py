"""keep_freed_memory: freed activation-sized blocks are reused without faulting their pages in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")

# what every training step does: allocate large activations, free them, allocate them again
SCRIPT = """
import resource, sys, torch
from studio.allocator import keep_freed_memory
tuned = sys.argv[1] == "tuned" and keep_freed_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(8 * 2 ** 20) for _ in range(4)]  # 4 x 32 MB, at glibc's largest mmap threshold
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del blocks
print(tuned, min(faults[-3:]), max(faults[-3:]))  # steady state: the first rounds settle the heap
"""


def _faults(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    tuned, low, high = out.stdout.split()
    return tuned, int(low), int(high)


def test_reused_block_does_not_fault_again():
    assert _faults("default")[1] > 30_000   # glibc's default: 128 MB = 32 768 fresh pages every round
    tuned, _, high = _faults("tuned")
    assert tuned == "True"
    assert high < 1_000                      # the freed blocks came back from the heap, pages resident
