"""Triton kernel of ``sgsc::packed_linear``: fused dequantize-and-multiply from bit-packed codes.

The layout is documented, with a worked example, in :mod:`sgsc.ops.packed`. Each program owns one
tile (8 output rows) and a block of ``BLOCK_M`` batch rows. It walks the tile's segments; for each
block of ``BLOCK_K`` columns it gathers the words of the 8 lanes, extracts the codes (slot ``k % PER``
of word ``k // PER``), scales them, and accumulates ``x @ codes`` in fp32 registers. The weight is
never written to memory. Rows no tile names (pruned) keep the bias the launcher wrote.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgsc.ops.spec import LANES  # rows per tile


@triton.jit
def _packed_linear_kernel(
    x_ptr,  # *f32 (M, K) contiguous activations
    y_ptr,  # *f32 (M, N) contiguous output, pre-filled with the bias (or zeros)
    words_ptr,  # *i32 (n_words,) packed codes
    seg_ptr,  # *i64 (S, 3) segments: k0, k1, width
    seg_scale_ptr,  # *f32 (S,) scale of each segment's columns
    tile_table_ptr,  # *i64 (TS, 2) segment and word offset of each tile's segments
    tile_ptr_ptr,  # *i64 (T + 1,) tile t's segments are tile_table[tile_ptr[t]:tile_ptr[t + 1]]
    rows_ptr,  # *i32 (T, 8) output row of each lane, -1 for padding
    row_scale_ptr,  # *f32 (T, 8) scale of each lane
    M,  # batch rows
    K,  # in_features
    N,  # out_features
    BLOCK_M: tl.constexpr,  # batch rows per program
    BLOCK_K: tl.constexpr,  # columns per step
):
    tile = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, LANES)
    cols = tl.arange(0, BLOCK_K)
    m_mask = m < M
    acc = tl.zeros([BLOCK_M, LANES], dtype=tl.float32)
    first = tl.load(tile_ptr_ptr + tile)
    last = tl.load(tile_ptr_ptr + tile + 1)
    for i in range(first, last):
        seg = tl.load(tile_table_ptr + 2 * i)
        offset = tl.load(tile_table_ptr + 2 * i + 1)
        k0 = tl.load(seg_ptr + 3 * seg)
        length = tl.load(seg_ptr + 3 * seg + 1) - k0
        width = tl.load(seg_ptr + 3 * seg + 2)
        scale = tl.load(seg_scale_ptr + seg)
        raw = width > 16  # one signed int32 code per word, no offset
        per = tl.where(raw, 1, 32 // tl.maximum(width, 1))
        slot = 32 // per
        field_mask = tl.where(raw, -1, (1 << slot) - 1).to(tl.int64)
        code_offset = tl.where(raw, 0, 1 << (tl.maximum(width, 1) - 1)).to(tl.int64)
        for kb in range(0, length, BLOCK_K):
            k = kb + cols
            k_mask = k < length
            word_index = offset + (k // per)[:, None] * LANES + lanes[None, :]  # (BLOCK_K, 8)
            word = tl.load(words_ptr + word_index, mask=k_mask[:, None], other=0).to(tl.int64)
            word = word & 0xFFFFFFFF  # the 32 bits, unsigned
            field = (word >> ((k % per) * slot)[:, None]) & field_mask
            code = tl.where(raw, tl.where(field >= 2**31, field - 2**32, field), field - code_offset)
            w = code.to(tl.float32) * scale  # (BLOCK_K, 8)
            xv = tl.load(x_ptr + m[:, None] * K + (k0 + k)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(xv[:, :, None] * w[None, :, :], axis=1)
    rows = tl.load(rows_ptr + tile * LANES + lanes).to(tl.int64)
    row_scale = tl.load(row_scale_ptr + tile * LANES + lanes)
    y_index = m[:, None] * N + rows[None, :]
    out_mask = m_mask[:, None] & (rows >= 0)[None, :]
    bias = tl.load(y_ptr + y_index, mask=out_mask, other=0.0)
    tl.store(y_ptr + y_index, acc * row_scale[None, :] + bias, mask=out_mask)


def launch_config(M: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_K)``: the whole batch in one program up to 16 rows (each word is read once)."""
    return min(16, triton.next_power_of_2(max(M, 1))), 64


def packed_linear(x, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features, bias):
    M, K = x.shape
    # A fresh tensor (for M == 1 an expanded bias is already "contiguous" and would alias it).
    y = torch.zeros(M, out_features, dtype=torch.float32, device=x.device)
    if bias is not None:
        y += bias
    tiles = rows.shape[0]
    if M == 0 or tiles == 0:
        return y
    block_m, block_k = launch_config(M)
    grid = (tiles, triton.cdiv(M, block_m))
    _packed_linear_kernel[grid](
        x.contiguous(), y, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale,
        M, K, out_features, BLOCK_M=block_m, BLOCK_K=block_k,
    )
    return y
