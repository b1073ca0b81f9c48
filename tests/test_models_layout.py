"""Loading a base in channels_last: same numbers, and no second resident copy of the conv weights."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
import torch

from builders import tiny_vae
from studio.models import _file_mappings, _release_file_pages, to_channels_last

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux only")


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields[0].split("-")) == 2 and ":" not in fields[0]:
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@linux_only
def test_released_file_pages_leave_memory_and_keep_their_bytes(tmp_path):
    path = tmp_path / "weights.bin"
    values = np.arange(4 << 20, dtype=np.float32)  # 16 MiB
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    assert float(mapped.sum(dtype=np.float64)) == float(values.sum(dtype=np.float64))  # every page read
    before = _resident_kb(path)
    assert before >= 15 * 1024
    span = (mapped.ctypes.data + mmap.PAGESIZE // 2, mapped.nbytes - mmap.PAGESIZE)  # not page-aligned
    _release_file_pages(span, _file_mappings())
    assert _resident_kb(path) <= before - 15 * 1024 + 8  # all but the partial first and last pages
    assert np.array_equal(np.asarray(mapped), values)  # faulted back in from the file, unchanged


def test_anonymous_memory_is_never_released():
    tensor = torch.arange(1 << 20, dtype=torch.float32)
    _release_file_pages((tensor.data_ptr(), tensor.nbytes), _file_mappings())
    assert torch.equal(tensor, torch.arange(1 << 20, dtype=torch.float32))


def _convs(module):
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]


def test_channels_last_base_from_a_file_gives_the_same_images(tmp_path):
    torch.manual_seed(0)
    tiny_vae().save_pretrained(tmp_path / "vae")
    from diffusers import AutoencoderKL

    reference = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    converted = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()  # memory-mapped weights
    to_channels_last(converted)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(converted.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean, atol=1e-5)
        # each module converts on its first forward: the decoder, not run yet, is untouched
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _convs(converted.encoder))
        assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in _convs(converted.decoder))
        assert torch.allclose(converted(x).sample, reference(x).sample, atol=1e-5)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _convs(converted))
    for mine, theirs in zip(converted.parameters(), reference.parameters()):
        assert torch.equal(mine, theirs)
