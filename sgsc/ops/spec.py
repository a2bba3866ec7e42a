"""The numbers every implementation of the ops shares, each defined once.

The C++ kernels (csrc/) and the Triton kernels (kernels/) cannot import Python; where they repeat a
formula from here, a comment names this module, and the tests hold them to it.
"""

from __future__ import annotations

import torch

ROUNDING_MODES = ("nearest", "floor")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTH_DTYPES = (torch.uint8, torch.int32, torch.int64)

# The largest |e| of eq. (1): beyond it 2^e or 2^-e leaves the normal float32 range, where the float
# arithmetic would give NaN (0 * inf) instead of eq. (1)'s real value. CPU raises; CUDA poisons the group.
MAX_EXPONENT = 126.0

# The widest integer code a group stores, and the largest bit depth a layer may start at: at b >= 32
# the float32 clamp bound 2^31 - 1 rounds to 2^31, which no 32-bit code holds.
MAX_WIDTH = 32

# Rows per tile of the packed runtime's layout (sgsc.ops.packed); the C++ kernels' kLanes
# (csrc/packed_layout.h) must equal it, which every C++ call on a Python-built layout checks.
LANES = 8

# Columns per block of the packed runtime's int8 activations (sgsc.ops.packed.packed_linear with
# activations="int8"): each batch row's x is quantized per block of this many columns, counted from the
# start of each segment's column range; the C++ kernel's kQBlock (csrc/packed_linear_q8.cpp) equals it.
# 480 = lcm(32, 10, 6, 5): a block holds whole 32-bit words of codes at every width up to 8 bits.
Q8_BLOCK = 480


def stream_bytes(width, group_len: int):
    """Bytes of one group's packed stream: ``ceil(width * group_len / 8)``.

    ``width`` may be an int or an integer tensor of widths (the result then has its shape).
    """
    return (width * group_len + 7) // 8


def group_offsets(widths: torch.Tensor, group_len: int) -> torch.Tensor:
    """Byte offset of every group's stream in a packed run, int64 ``(G + 1,)`` on ``widths``' device.

    ``offsets[g]`` is the sum of :func:`stream_bytes` over the groups before ``g``; ``offsets[G]`` is
    the run's size. Computed on the device, so it needs no sync.
    """
    sizes = stream_bytes(widths.to(torch.int64), group_len)
    return torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])


def minimal_widths(codes: torch.Tensor) -> torch.Tensor:
    """Smallest two's-complement width per row of ``codes`` that holds all of its values (0 for all-zero rows)."""
    if codes.numel() == 0:
        return torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
    # widened after the reductions (-(-2^31) overflows int32), so no int64 copy of the codes is made
    high = codes.amax(dim=1).to(torch.int64).clamp_min(0)
    low = (-codes.amin(dim=1).to(torch.int64) - 1).clamp_min(0)  # -2^(w-1) <= min  <=>  bit_length(-min - 1) <= w - 1
    magnitude = torch.maximum(high, low)
    thresholds = 2 ** torch.arange(63, device=codes.device, dtype=torch.int64)
    bit_length = (magnitude.unsqueeze(1) >= thresholds).sum(dim=1)
    nonzero = (codes != 0).any(dim=1)
    return torch.where(nonzero, bit_length + 1, torch.zeros_like(bit_length))
