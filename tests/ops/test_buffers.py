"""The C++ kernels' large fresh outputs ask the kernel for transparent huge pages.

On the development VM a first touch of a fresh 4 KiB page costs more than computing the value
written to it, so at 64 MB this advice is what makes forward+backward 2.5-3x faster (bench/RESULTS.md).
The flag is read back from /proc/self/smaps: `hg` in a mapping's VmFlags means MADV_HUGEPAGE was
applied to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sgsc import ops
from sgsc.ops import native as _native

pytestmark = [
    pytest.mark.skipif(not _native.available(), reason="the advice is the C++ kernels' own allocation"),
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or not Path("/sys/kernel/mm/transparent_hugepage").exists(),
        reason="needs Linux with transparent huge pages",
    ),
]

LARGE = (2048, 2048)  # 16 MiB of float32: several whole 2 MiB pages inside any placement


def vm_flags(address: int) -> set[str]:
    """VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds address {address:#x}")


def interior(t: torch.Tensor) -> int:
    """An address in the middle of ``t``'s buffer, inside its 2 MiB-aligned advised part."""
    return t.data_ptr() + t.nbytes // 2


def quantize_inputs(shape):
    return torch.randn(shape), torch.full((shape[0],), 4.0), torch.zeros(shape[0])


def test_fake_quantize_forward_and_backward_outputs():
    w, b, e = quantize_inputs(LARGE)
    q = torch.ops.sgsc.fake_quantize(w, b, e, "nearest")
    grad_w, _, _ = torch.ops.sgsc.fake_quantize_backward(torch.ones_like(w), w, b, e, "nearest")
    assert "hg" in vm_flags(interior(q))
    assert "hg" in vm_flags(interior(grad_w))


def test_unpacked_codes():
    codes = torch.randint(-8, 8, LARGE, dtype=torch.int32)
    widths = torch.full((LARGE[0],), 4, dtype=torch.int32)
    unpacked = ops.unpack(ops.pack(codes, widths), widths, 1, LARGE[1])
    assert torch.equal(unpacked, codes)
    assert "hg" in vm_flags(interior(unpacked))
