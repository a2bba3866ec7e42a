"""Triton kernels of ``sgsc::pack`` and ``sgsc::unpack``: integer codes with a bit width per group.

The layout is documented, with a worked example, in :func:`sgsc.ops.pack`: group ``g``'s stream
starts at byte ``offsets[g]``, and code ``i`` of the group fills bits ``[i*w, (i+1)*w)`` of that
stream with the low ``w`` bits of its two's complement, least significant bit first.

Both kernels give each program a block of ``BLOCK_CODES`` codes of one group; ``BLOCK_CODES`` is a
multiple of 8, and 8 codes of any width fill whole bytes, so every block starts on a byte boundary.

* ``unpack``: each code reads the (at most 5) bytes its bits touch, shifts the field down and sign
  extends it.
* ``pack``: a program owns the output bytes of its block of codes and builds each byte by
  gathering the (at most 8) codes overlapping it. No byte is written by two programs, so the
  kernel is race-free and deterministic without atomics. Each program also checks its codes
  against its group's range and writes one flag; the launcher turns a raised flag into the same
  ``ValueError`` as the CPU op (one device sync, which the data-dependent output size needs anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sgsc.ops import reference
from sgsc.ops.spec import MAX_WIDTH, group_offsets


@triton.jit
def _unpack_kernel(
    packed_ptr,  # *u8  (total_bytes,) the packed streams of all groups
    out_ptr,  # *i32 (G, L) contiguous output codes
    widths_ptr,  # *i32 (G,) bits per code of each group, in [0, 32]
    offsets_ptr,  # *i64 (G + 1,) byte offset of each group's stream
    group_len,  # L, codes per group
    blocks_per_group,  # cdiv(L, BLOCK_CODES)
    total_bytes,  # packed.numel(): no byte outside [0, total_bytes) is read, whatever the widths say
    BLOCK_CODES: tl.constexpr,  # codes per program, a multiple of 8
):
    pid = tl.program_id(0).to(tl.int64)
    group = pid // blocks_per_group
    width = tl.load(widths_ptr + group).to(tl.int64)
    stream = tl.load(offsets_ptr + group)
    idx = (pid % blocks_per_group) * BLOCK_CODES + tl.arange(0, BLOCK_CODES)
    mask = idx < group_len
    bit = idx * width  # first bit of each code in its group's stream
    byte = stream + (bit >> 3)
    shift = bit & 7
    # A code's bits span bytes [byte, byte + ceil((shift + width) / 8)): at most 5 for 32 bits.
    word = tl.zeros([BLOCK_CODES], dtype=tl.int64)
    for j in tl.static_range(5):
        touched = mask & (j * 8 < shift + width) & (byte + j >= 0) & (byte + j < total_bytes)
        word |= tl.load(packed_ptr + byte + j, mask=touched, other=0).to(tl.int64) << (8 * j)
    # Move the field to the top of the 64-bit word and back with an arithmetic shift: sign extension.
    top = 64 - tl.maximum(width, 1)
    value = ((word >> shift) << top) >> top
    value = tl.where(width > 0, value, 0)  # width 0: a pruned group unpacks to zeros
    tl.store(out_ptr + group * group_len + idx, value.to(tl.int32), mask=mask)


@triton.jit
def _pack_kernel(
    ints_ptr,  # *i32 (G, L) contiguous codes
    packed_ptr,  # *u8  (total_bytes,) output streams
    bad_ptr,  # *i8  (n_programs,) output: 1 where the program met a code outside its group's range
    widths_ptr,  # *i32 (G,) bits per code of each group, in [0, 32]
    offsets_ptr,  # *i64 (G + 1,) byte offset of each group's stream
    group_len,  # L, codes per group
    blocks_per_group,  # cdiv(L, BLOCK_CODES)
    BLOCK_CODES: tl.constexpr,  # codes per program, a multiple of 8
    BLOCK_BYTES: tl.constexpr,  # output bytes built per step of the byte loop
):
    pid = tl.program_id(0).to(tl.int64)
    group = pid // blocks_per_group
    width = tl.load(widths_ptr + group).to(tl.int64)
    stream = tl.load(offsets_ptr + group)
    first = (pid % blocks_per_group) * BLOCK_CODES
    codes_ptr = ints_ptr + group * group_len  # this group's codes

    # Range check of this block: [-2^(w-1), 2^(w-1) - 1], and [0, 0] for a pruned group.
    idx = first + tl.arange(0, BLOCK_CODES)
    mask = idx < group_len
    codes = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.int64)
    half = (1 << width) >> 1
    outside = mask & ((codes < -half) | (codes > tl.maximum(half - 1, 0)))
    tl.store(bad_ptr + pid, tl.max(outside.to(tl.int8), axis=0))

    # Output bytes of this block: [first * w / 8, ceil((first + n) * w / 8)) of the group's stream.
    n_codes = tl.minimum(group_len - first, BLOCK_CODES)
    first_byte = (first * width) >> 3
    n_bytes = (n_codes * width + 7) >> 3
    field_mask = (1 << width) - 1
    safe_width = tl.maximum(width, 1)
    codes_per_byte = (7 + safe_width - 1) // safe_width + 1  # most codes one byte can overlap
    for start in range(0, n_bytes, BLOCK_BYTES):
        k = start + tl.arange(0, BLOCK_BYTES)
        in_block = k < n_bytes
        byte_bit = (first_byte + k) * 8  # first bit of this byte in the group's stream
        first_code = byte_bit // safe_width  # the code holding the byte's first bit
        acc = tl.zeros([BLOCK_BYTES], dtype=tl.int64)
        for j in range(0, codes_per_byte):
            code = first_code + j
            code_bit = code * width
            overlaps = in_block & (code < group_len) & (code_bit < byte_bit + 8)
            field = tl.load(codes_ptr + code, mask=overlaps, other=0).to(tl.int64) & field_mask
            rel = code_bit - byte_bit  # where the field starts relative to the byte, in (-w, 8)
            up = field << tl.maximum(rel, 0)
            down = field >> tl.maximum(-rel, 0)
            acc |= tl.where(rel >= 0, up, down)
        tl.store(packed_ptr + stream + first_byte + k, (acc & 0xFF).to(tl.uint8), mask=in_block)


@dataclass(frozen=True)
class LaunchConfig:
    block_codes: int
    block_bytes: int
    blocks_per_group: int
    num_warps: int

    def grid(self, n_groups: int) -> tuple[int]:
        return (n_groups * self.blocks_per_group,)


_MAX_BLOCK_CODES = 1024  # codes per program on long groups: 4 KiB of int32 in, enough to stream
_MIN_BLOCK_CODES = 16  # a multiple of 8, so blocks start on byte boundaries


def launch_config(group_len: int) -> LaunchConfig:
    """One program per block of codes of one group; short groups get small blocks, not idle lanes."""
    block_codes = max(_MIN_BLOCK_CODES, min(_MAX_BLOCK_CODES, triton.next_power_of_2(max(group_len, 1))))
    # Pack builds a block's B*w/8 bytes in steps of B/4: one step up to 2-bit codes, 16 for 32-bit ones.
    block_bytes = block_codes // 4
    num_warps = 4 if block_codes >= 512 else 1
    return LaunchConfig(block_codes, block_bytes, triton.cdiv(group_len, block_codes), num_warps)


def pack(ints: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Pack int32 codes grouped along dim 0 with one width per group; see :func:`sgsc.ops.functional.pack`."""
    n_groups = widths.numel()
    group_len = ints.numel() // n_groups
    codes = ints.contiguous().reshape(n_groups, group_len)
    bad_width = ((widths < 0) | (widths > MAX_WIDTH)).nonzero()  # one sync; the output size needs one anyway
    if bad_width.numel():
        group = int(bad_width[0, 0])
        raise ValueError(f"sgsc.pack: widths must be in [0, {MAX_WIDTH}], got {int(widths[group])} at group {group}")
    offsets = group_offsets(widths, group_len)
    packed = torch.empty(int(offsets[-1]), dtype=torch.uint8, device=ints.device)
    if codes.numel() == 0:
        return packed
    cfg = launch_config(group_len)
    grid = cfg.grid(n_groups)
    bad = torch.empty(grid[0], dtype=torch.int8, device=ints.device)
    _pack_kernel[grid](
        codes, packed, bad, widths.to(torch.int32).contiguous(), offsets, group_len, cfg.blocks_per_group,
        BLOCK_CODES=cfg.block_codes, BLOCK_BYTES=cfg.block_bytes, num_warps=cfg.num_warps,
    )
    if bool(bad.any()):
        _raise_out_of_range(codes, widths, int(bad.nonzero()[0, 0]) // cfg.blocks_per_group)
    return packed


def _raise_out_of_range(codes: torch.Tensor, widths: torch.Tensor, group: int) -> None:
    """The ``ValueError`` of the CPU op for the first code of ``group`` outside its range."""
    width = int(widths[group])
    lo, hi = reference.code_range(width)
    row = codes[group]
    index = int(((row < lo) | (row > hi)).nonzero()[0, 0])
    raise ValueError(reference.out_of_range_message(group, width, index, int(row[index])))


def unpack(
    packed: torch.Tensor, widths: torch.Tensor, rows_per_group: int, row_len: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 codes of shape ``(G * rows_per_group, row_len)`` from :func:`pack`'s output, written
    into ``out`` (contiguous int32, ``G * L`` elements, any shape) when it is given."""
    n_groups = widths.numel()
    group_len = rows_per_group * row_len
    if out is None:
        out = torch.empty((n_groups * rows_per_group, row_len), dtype=torch.int32, device=packed.device)
    if out.numel() == 0:
        return out
    cfg = launch_config(group_len)
    _unpack_kernel[cfg.grid(n_groups)](
        packed.contiguous(), out, widths.to(torch.int32).contiguous(), group_offsets(widths, group_len),
        group_len, cfg.blocks_per_group, packed.numel(),
        BLOCK_CODES=cfg.block_codes, num_warps=cfg.num_warps,
    )
    return out
