"""Triton kernels of ``sgsc::fake_quantize`` (forward) and its fused straight-through backward.

``w`` is viewed as a ``(G, L)`` matrix: group ``g`` is the contiguous run of ``L = numel / G``
elements that holds its rows. A program owns ``BLOCK_G`` groups and a contiguous range of columns,
which it walks in ``(BLOCK_G, BLOCK_L)`` tiles. The backward sums its per-group gradient terms
over its own range and writes one partial per (column range, group); the partials are added up in
a fixed order afterwards, so ``grad_b`` and ``grad_e`` are deterministic (no atomics).

The per-group constants use libdevice's ``exp2`` (``tl.exp2`` is an approximation on CUDA), the
function PyTorch's own CUDA ``exp2`` calls, so outputs match ``sgsc.ops.reference`` bit for bit. The
CPU interpreter has no libdevice and uses NumPy's ``exp2``, which can differ from PyTorch's CPU
``exp2`` in the last bit for fractional arguments (never for whole ones).
Non-finite ``b`` or ``e``, or ``|e| > MAX_EXPONENT``, cannot raise from a kernel without a device sync;
that group's output and gradients become NaN instead of silently clamping.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from sgsc.ops import spec

MAX_EXPONENT = tl.constexpr(spec.MAX_EXPONENT)

_LN2 = math.log(2.0)


@triton.jit
def _exp2(x, EXACT_EXP2: tl.constexpr):
    if EXACT_EXP2:
        return libdevice.exp2(x)
    else:
        return tl.exp2(x)


@triton.jit
def _group_constants(b_ptr, e_ptr, groups, group_mask, EXACT_EXP2: tl.constexpr):
    b = tl.load(b_ptr + groups, mask=group_mask, other=0.0)
    e = tl.load(e_ptr + groups, mask=group_mask, other=0.0)
    bits = tl.where(b > 0.0, b, 0.0)
    half = _exp2(bits - 1.0, EXACT_EXP2)
    scale = _exp2(-e, EXACT_EXP2)
    inv_scale = _exp2(e, EXACT_EXP2)
    # |x| <= bound is false for NaN and Inf; |e| > MAX_EXPONENT (sgsc.ops.spec) would overflow 2^e or 2^-e
    poisoned = ~((tl.abs(b) <= 3.4028234663852886e38) & (tl.abs(e) <= MAX_EXPONENT))
    return scale, inv_scale, -half, half - 1.0, bits > 0.0, poisoned


@triton.jit
def _quantize_tile(s, lo, hi, FLOOR: tl.constexpr):
    # Written as selects so that NaN in w falls through both comparisons and propagates.
    clamped = tl.where(s < lo, lo, s)
    clamped = tl.where(clamped > hi, hi, clamped)
    down = tl.floor(clamped)
    if FLOOR:
        return down
    else:
        # Round half to even from floor, exact for every float32 (|x| >= 2^23 is already whole).
        frac = clamped - down
        down_is_odd = (down - 2.0 * tl.floor(down * 0.5)) == 1.0
        return tl.where((frac > 0.5) | ((frac == 0.5) & down_is_odd), down + 1.0, down)


@triton.jit
def _forward_kernel(
    w_ptr,  # *T   (G, L) contiguous weights
    q_ptr,  # *T   (G, L) contiguous output
    b_ptr,  # *f32 (G,) bit depths
    e_ptr,  # *f32 (G,) exponents
    n_groups,  # G
    group_len,  # L, elements per group
    cols_per_program,  # columns each program walks, a multiple of BLOCK_L
    FLOOR: tl.constexpr,  # floor rounding (eq. 1) instead of round-half-to-even
    EXACT_EXP2: tl.constexpr,  # libdevice exp2; off only in the interpreter, which lacks libdevice
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_L: tl.constexpr,  # columns per tile
):
    groups = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    group_mask = groups < n_groups
    scale, inv_scale, lo, hi, keep, poisoned = _group_constants(b_ptr, e_ptr, groups, group_mask, EXACT_EXP2)
    col_begin = tl.program_id(1).to(tl.int64) * cols_per_program
    col_end = tl.minimum(col_begin + cols_per_program, group_len)
    for start in range(col_begin, col_end, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        mask = group_mask[:, None] & (cols < col_end)[None, :]
        offsets = groups[:, None] * group_len + cols[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        q = _quantize_tile(w * scale[:, None], lo[:, None], hi[:, None], FLOOR) * inv_scale[:, None]
        q = tl.where(keep[:, None], q, 0.0)
        q = tl.where(poisoned[:, None], float("nan"), q)
        tl.store(q_ptr + offsets, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    grad_q_ptr,  # *T   (G, L) contiguous upstream gradient
    w_ptr,  # *T   (G, L) contiguous weights
    grad_w_ptr,  # *T   (G, L) contiguous output: straight-through gradient of w
    grad_b_partial_ptr,  # *f32 (SPLIT, G) output: this program's share of grad_b
    grad_e_partial_ptr,  # *f32 (SPLIT, G) output: this program's share of grad_e
    b_ptr,  # *f32 (G,) bit depths
    e_ptr,  # *f32 (G,) exponents
    n_groups,  # G
    group_len,  # L
    cols_per_program,  # columns each program walks, a multiple of BLOCK_L
    LN2: tl.constexpr,  # ln 2, the derivative factor of 2^x
    FLOOR: tl.constexpr,
    EXACT_EXP2: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    groups = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    group_mask = groups < n_groups
    scale, inv_scale, lo, hi, keep, poisoned = _group_constants(b_ptr, e_ptr, groups, group_mask, EXACT_EXP2)
    split = tl.program_id(1).to(tl.int64)
    col_begin = split * cols_per_program
    col_end = tl.minimum(col_begin + cols_per_program, group_len)
    sum_e = tl.zeros([BLOCK_G], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_G], dtype=tl.float32)
    for start in range(col_begin, col_end, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        mask = group_mask[:, None] & (cols < col_end)[None, :]
        offsets = groups[:, None] * group_len + cols[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        s = w * scale[:, None]
        r = _quantize_tile(s, lo[:, None], hi[:, None], FLOOR)
        inside = (s >= lo[:, None]) & (s <= hi[:, None])
        grad_w = tl.where(inside & keep[:, None], g, 0.0)
        grad_w = tl.where(poisoned[:, None], float("nan"), grad_w)
        tl.store(grad_w_ptr + offsets, grad_w.to(grad_w_ptr.dtype.element_ty), mask=mask)
        sum_e += tl.sum(tl.where(inside, g * (r - s), g * r), axis=1)
        sum_b += tl.sum(tl.where(s > hi[:, None], g, 0.0) - tl.where(s < lo[:, None], g, 0.0), axis=1)
    step = LN2 * inv_scale
    grad_e = tl.where(keep, step * sum_e, 0.0)
    grad_b = tl.where(keep, step * (-lo) * sum_b, 0.0)
    grad_e = tl.where(poisoned, float("nan"), grad_e)
    grad_b = tl.where(poisoned, float("nan"), grad_b)
    tl.store(grad_e_partial_ptr + split * n_groups + groups, grad_e, mask=group_mask)
    tl.store(grad_b_partial_ptr + split * n_groups + groups, grad_b, mask=group_mask)


@dataclass(frozen=True)
class LaunchConfig:
    block_g: int
    block_l: int
    cols_per_program: int
    split: int
    num_warps: int

    def grid(self, n_groups: int) -> tuple[int, int]:
        return (triton.cdiv(n_groups, self.block_g), self.split)


_TILE_ELEMENTS = 4096  # elements per tile: enough in flight per program to stream at bandwidth
_PROGRAMS_PER_SM = 4


def _streaming_multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: fewer, larger programs run faster on the CPU


@functools.lru_cache(maxsize=1024)  # a training run sees a handful of shapes, each every step
def launch_config(n_groups: int, group_len: int, device: torch.device) -> LaunchConfig:
    """Tile shape and column split: wide tiles along a group, more groups per tile when groups are
    short, and groups split into column ranges only when there are too few groups to fill the GPU."""
    block_l = min(triton.next_power_of_2(max(group_len, 1)), 1024)
    block_g = min(triton.next_power_of_2(n_groups), max(1, _TILE_ELEMENTS // block_l))
    group_programs = triton.cdiv(n_groups, block_g)
    wanted = _PROGRAMS_PER_SM * _streaming_multiprocessors(device)
    split = max(1, min(triton.cdiv(group_len, block_l), triton.cdiv(wanted, group_programs)))
    cols_per_program = triton.cdiv(triton.cdiv(group_len, split), block_l) * block_l
    split = triton.cdiv(group_len, cols_per_program)
    num_warps = 8 if block_g * block_l >= 4096 else 4
    return LaunchConfig(block_g, block_l, cols_per_program, split, num_warps)


def _as_groups(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    n_groups = b.shape[0]
    return w.contiguous(), n_groups, w.numel() // n_groups


def forward(w: torch.Tensor, b: torch.Tensor, e: torch.Tensor, rounding: str, out: torch.Tensor) -> None:
    """Write ``fake_quantize(w, b, e)`` into the contiguous tensor ``out``."""
    w, n_groups, group_len = _as_groups(w, b)
    if w.numel() == 0:
        return
    cfg = launch_config(n_groups, group_len, w.device)
    _forward_kernel[cfg.grid(n_groups)](
        w, out, b.contiguous(), e.contiguous(), n_groups, group_len, cfg.cols_per_program,
        FLOOR=rounding == "floor", EXACT_EXP2=w.is_cuda, BLOCK_G=cfg.block_g, BLOCK_L=cfg.block_l, num_warps=cfg.num_warps,
    )


def backward(
    grad_q: torch.Tensor, w: torch.Tensor, b: torch.Tensor, e: torch.Tensor, rounding: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through gradients ``(grad_w, grad_b, grad_e)`` in one pass over ``w`` and ``grad_q``."""
    w, n_groups, group_len = _as_groups(w, b)
    grad_w = torch.empty_like(w)
    if w.numel() == 0:
        return grad_w, torch.zeros_like(b), torch.zeros_like(e)
    grad_q = grad_q.to(w.dtype).contiguous()
    cfg = launch_config(n_groups, group_len, w.device)
    grad_b_partial = torch.empty((cfg.split, n_groups), dtype=torch.float32, device=w.device)
    grad_e_partial = torch.empty_like(grad_b_partial)
    _backward_kernel[cfg.grid(n_groups)](
        grad_q, w, grad_w, grad_b_partial, grad_e_partial, b.contiguous(), e.contiguous(),
        n_groups, group_len, cfg.cols_per_program,
        LN2=_LN2, FLOOR=rounding == "floor", EXACT_EXP2=w.is_cuda, BLOCK_G=cfg.block_g, BLOCK_L=cfg.block_l, num_warps=cfg.num_warps,
    )
    if cfg.split == 1:
        return grad_w, grad_b_partial[0], grad_e_partial[0]
    return grad_w, grad_b_partial.sum(0), grad_e_partial.sum(0)
