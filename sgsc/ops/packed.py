"""Packed runtime ops: ``y = x W^T`` computed from integer codes bit-packed at each group's width.

Schemas, fake kernels, device registrations and the public wrappers of ``sgsc::packed_linear``,
``sgsc::packed_dequantize`` and ``sgsc::packed_dequantize_out``, plus :func:`pack_weight`, which
builds the in-memory layout they read (device-independent integers; never written to a file).

Layout (:class:`PackedWeight`), built for speed of a batch-1 GEMV on 8-wide SIMD:

* Rows are cut into **tiles of 8**. With output-row groups (``group_by="output"``) rows are first
  sorted by width, widest first, and pruned rows (width 0) are dropped; a tile's width is its widest
  row's, and ``rows[t, r]`` names the output row of lane ``r`` (``-1`` pads the last tile). With
  input-column groups rows stay in order.
* A tile holds **segments**: a run of columns ``[k0, k1)`` at one width ``W`` (``seg_table`` rows
  ``[k0, k1, W]``). Output-row groups: one segment ``[0, K)`` per distinct tile width. Input-column
  groups: one segment per unpruned column group, shared by every tile; pruned columns store nothing.
* A 32-bit word holds ``PER = codes_per_word(W) = 32 // W`` codes (``W <= 16``) in slots of
  ``32 // PER`` bits, code ``j`` of the word in the low bits of slot ``j``; for ``W > 16`` a word
  is one raw signed code. ``W <= 16`` stores ``u = code + 2^(W-1)`` (non-negative, so the kernels
  never sign-extend). Word ``i`` of the 8 lanes are 8 consecutive int32 (``words[off + 8*i + r]``),
  so one 32-byte load feeds 8 rows. The last word's unused slots, and padding lanes, hold 0.
* Scales: ``row_scale[t, r]`` (output-row groups: the row's group scale; 1 for input groups) times
  ``seg_scale[s]`` (input groups: the column group's scale; 1 for output groups). Every scale is a
  power of two, so ``code * seg_scale * row_scale`` is exactly the dequantized weight.

Worked example (pinned in ``tests/test_packed_runtime.py``): output groups, 2 rows x 3 columns,
codes ``[[-4, 1, 0], [3, 0, -1]]`` (both rows need 3 bits), scales ``[0.5, 0.25]``::

    one tile, W = 3: PER = 10 codes per word in 3-bit slots, u = code + 4
    row 0: u = 0, 5, 4 -> word = 0 | 5 << 3 | 4 << 6 = 0x128
    row 1: u = 7, 4, 3 -> word = 7 | 4 << 3 | 3 << 6 = 0x0E7
    words     = [0x128, 0x0E7, 0, 0, 0, 0, 0, 0]      (lanes 2..7 pad)
    seg_table = [[0, 3, 3]], seg_scale = [1.0], tile_table = [[0, 0]], tile_ptr = [0, 1]
    rows      = [[0, 1, -1, -1, -1, -1, -1, -1]], row_scale = [[0.5, 0.25, 0, 0, 0, 0, 0, 0]]

Numerics: the CPU kernel accumulates ``sum_k u * x`` in fp32 (8-row vectors, 1 to 4 partial sums
per row) and subtracts ``2^(W-1) * sum_k x`` (summed in float64), so against the exact product its
error is at most about ``(K + 2) * eps * scale * 2^W * sum_k |x_k|`` per output (eps = 2^-24): the
bound of an fp32 dot product of length K whose terms are at most ``scale * 2^W * |x_k|``. ``W`` is
the width the codes are stored at: the column group's, or the tile's (the widest of its 8 rows,
which differs from a row's own width only in the few tiles where the sorted widths change).
Every batch size runs that kernel (in chunks of 8, 4, 2 and 1 batch rows), so the bound holds for all.

Int8 activations (``activations="int8"``, op ``sgsc::packed_linear_q8``): each batch row of ``x`` is
quantized to int8 in blocks of ``Q8_BLOCK = 480`` columns (counted from the start of each segment's
column range): ``s = absmax / 127``, ``q = round(x / s)``, ``x_hat = q * s``
(:func:`sgsc.ops.reference.quantize_activations`). Segments at widths 1, 2, 4, 7 and 8 then multiply
bytes of codes by bytes of ``q`` in exact int32 sums (AVX-512 VNNI ``vpdpbusd``; AVX2 ``vpmaddubsw``, where
8-bit codes take the float loop; plain integer code elsewhere), and with AVX-512 VBMI widths 3, 5 and 6
as well (``vpmultishiftqb``), one fp32 multiply-add per block; the other widths run the float loop on
``x_hat``. The result is ``F.linear(x_hat, W, bias)``
within the fp32 bound above, so against ``F.linear(x, W, bias)`` it is off by at most that plus
``sum_k |W_rk| * |x_k - x_hat_k|``, where ``|x_k - x_hat_k| <= s_b / 2 = absmax_b / 254`` (the stated
bound, :func:`int8_error_bound`). For Gaussian activations the error is 0.6-0.8% of the output's norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sgsc.ops import native as _native
from sgsc.ops import reference
from sgsc.ops.functional import _check_tensor
from sgsc.ops.library import _triton_module
from sgsc.ops.spec import LANES, MAX_WIDTH, minimal_widths, stream_bytes

GROUP_BY = ("output", "input")
# How a packed linear layer takes its activations: float32 as given (exact within fp32 rounding), or
# quantized to int8 per block of Q8_BLOCK columns (faster; within int8_error_bound).
ACTIVATIONS = ("float", "int8")

_LAYOUT = ("Tensor words, Tensor seg_table, Tensor seg_scale, Tensor tile_table, Tensor tile_ptr, "
           "Tensor rows, Tensor row_scale")
torch.library.define("sgsc::packed_linear", f"(Tensor x, {_LAYOUT}, int out_features, Tensor? bias) -> Tensor")
torch.library.define("sgsc::packed_linear_q8", f"(Tensor x, {_LAYOUT}, int out_features, Tensor? bias) -> Tensor")
torch.library.define("sgsc::packed_dequantize", f"({_LAYOUT}, int out_features, int in_features) -> Tensor")
torch.library.define(
    "sgsc::packed_dequantize_out",
    f"({_LAYOUT}, int out_features, int in_features, Tensor(a!) out) -> ()",
)


def codes_per_word(width: int) -> int:
    """Codes one 32-bit word holds at ``width`` bits: ``32 // width`` up to 16 bits, else one raw code."""
    return 32 // width if width <= 16 else 1


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix ``(out_features, in_features)`` as bit-packed integer codes (layout: module docstring)."""

    words: torch.Tensor  # int32 (n_words,)
    seg_table: torch.Tensor  # int64 (S, 3): k0, k1, width
    seg_scale: torch.Tensor  # float32 (S,)
    tile_table: torch.Tensor  # int64 (TS, 2): segment, word offset of each tile's segment
    tile_ptr: torch.Tensor  # int64 (T + 1,): tile t's segments are tile_table[tile_ptr[t]:tile_ptr[t + 1]]
    rows: torch.Tensor  # int32 (T, 8): output row of each lane, -1 for padding
    row_scale: torch.Tensor  # float32 (T, 8)
    out_features: int
    in_features: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.words, self.seg_table, self.seg_scale, self.tile_table, self.tile_ptr, self.rows, self.row_scale)

    @property
    def nbytes(self) -> int:
        """Resident bytes of the layout: the words plus the tables."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.words.device


TENSOR_NAMES = ("words", "seg_table", "seg_scale", "tile_table", "tile_ptr", "rows", "row_scale")
_TENSOR_DTYPES = (torch.int32, torch.int64, torch.float32, torch.int64, torch.int64, torch.int32, torch.float32)


# ---- building the layout --------------------------------------------------------------------


# Codes a packing step widens to int64 at a time: the staging tensors stay a few MiB for any layer,
# so loading a file peaks near the packed size, not at several times the float weights.
_STAGING_CODES = 1 << 20


def _pack_words(codes: torch.Tensor, width: int, live: torch.Tensor) -> torch.Tensor:
    """``(tiles, 8, n)`` integer codes at ``width`` -> int32 words ``(tiles, n_words, 8)``, lane-minor.

    Lanes where ``live`` (``(tiles, 8)``) is False are padding and store zero words."""
    per = codes_per_word(width)
    tiles, lanes, n = codes.shape
    n_words = -(-n // per)
    if per == 1:
        return torch.where(live.unsqueeze(2), codes, 0).to(torch.int32).transpose(1, 2).contiguous()
    u = torch.zeros(tiles, lanes, n_words * per, dtype=torch.int64)
    u[:, :, :n] = torch.where(live.unsqueeze(2), codes.to(torch.int64) + (1 << (width - 1)), 0)
    slot = 32 // per
    shifts = torch.arange(per, dtype=torch.int64) * slot
    words = (u.reshape(tiles, lanes, n_words, per) << shifts).sum(dim=3)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # the 32 bits, read as int32
    return words.to(torch.int32).transpose(1, 2).contiguous()


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, group_by: str = "output") -> PackedWeight:
    """The :class:`PackedWeight` of integer ``codes`` ``(out_features, in_features)`` with one scale per group.

    ``scales`` (float32 ``(G,)``, powers of two) gives ``G`` groups: runs of ``out_features / G`` rows
    (``group_by="output"``) or of ``in_features / G`` columns (``"input"``). Each group is stored at the
    smallest width holding its codes (at most 32 bits); all-zero groups store nothing. The layout is
    built on the CPU; move it with :func:`to_device`.
    """
    _check_tensor("codes", codes, (torch.int32, torch.int64))
    _check_tensor("scales", scales, (torch.float32,))
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    if scales.dim() != 1:
        raise ValueError(f"scales must be 1-D, got shape {tuple(scales.shape)}")
    out_features, in_features = codes.shape
    axis_len = out_features if group_by == "output" else in_features
    groups = scales.shape[0]
    if (groups == 0 and axis_len != 0) or (groups and axis_len % groups):
        raise ValueError(f"scales has {groups} groups, which do not divide the {axis_len} "
                         f"{'rows' if group_by == 'output' else 'columns'} of codes")
    codes, scales = codes.detach().cpu(), scales.detach().cpu()  # int32 stays int32: _pack_words widens in steps
    if groups == 0 or codes.numel() == 0:
        return _assemble([], [], [], [], [], [], out_features, in_features)
    if group_by == "output":
        grouped = codes.reshape(groups, -1)
    else:
        grouped = codes.reshape(out_features, groups, -1).transpose(0, 1).reshape(groups, -1)
    widths = minimal_widths(grouped)
    if int(widths.max()) > MAX_WIDTH:
        g = int(widths.argmax())
        raise ValueError(f"codes of group {g} need {int(widths[g])} bits, more than {MAX_WIDTH}")
    if group_by == "output":
        return _pack_output_groups(codes, widths, scales)
    return _pack_input_groups(codes, widths, scales)


def _pack_output_groups(codes: torch.Tensor, widths: torch.Tensor, scales: torch.Tensor) -> PackedWeight:
    out_features, in_features = codes.shape
    per_group = out_features // widths.shape[0]
    row_width = widths.repeat_interleave(per_group)
    row_scale = scales.repeat_interleave(per_group)
    order = torch.argsort(-row_width * out_features + torch.arange(out_features))  # widest first, then row order
    order = order[row_width[order] > 0]  # pruned rows store nothing
    n_tiles = -(-order.numel() // LANES)
    lanes = torch.full((n_tiles * LANES,), -1, dtype=torch.int64)
    lanes[: order.numel()] = order
    lanes = lanes.reshape(n_tiles, LANES)
    tile_width = row_width[lanes[:, 0]]  # the widest row of each tile (rows sorted widest first)
    step = max(1, _STAGING_CODES // (LANES * max(in_features, 1)))  # tiles packed at a time
    seg_table, words, tile_table, offset = [], [], [], 0
    for width in tile_width.unique(sorted=True).flip(0).tolist():  # tiles of one width are consecutive
        seg = len(seg_table)
        seg_table.append([0, in_features, width])
        tiles = (tile_width == width).nonzero().flatten()
        for first in range(0, tiles.numel(), step):
            rows = lanes[tiles[first:first + step]]  # (t, 8), -1 for padding lanes
            block = _pack_words(codes[rows.clamp_min(0)], width, rows >= 0)  # (t, n_words, 8)
            tile_table += [[seg, offset + i * block[0].numel()] for i in range(rows.shape[0])]
            offset += block.numel()
            words.append(block.reshape(-1))
    scale = torch.where(lanes >= 0, row_scale[lanes.clamp_min(0)], torch.zeros(()))
    ptr = list(range(n_tiles + 1))
    return _assemble(words, seg_table, [1.0] * len(seg_table), tile_table, ptr, lanes, out_features, in_features, scale)


def _pack_input_groups(codes: torch.Tensor, widths: torch.Tensor, scales: torch.Tensor) -> PackedWeight:
    out_features, in_features = codes.shape
    columns = in_features // widths.shape[0]
    n_tiles = -(-out_features // LANES)
    lanes = torch.full((n_tiles * LANES,), -1, dtype=torch.int64)
    lanes[:out_features] = torch.arange(out_features)
    lanes = lanes.reshape(n_tiles, LANES)
    padded = torch.cat([codes, codes.new_zeros(1, in_features)])[lanes]  # (tiles, 8, K)
    kept = (widths > 0).nonzero().flatten().tolist()
    seg_table = [[g * columns, (g + 1) * columns, int(widths[g])] for g in kept]
    blocks = [_pack_words(padded[:, :, k0:k1], w, lanes >= 0) for k0, k1, w in seg_table]  # each (tiles, n_words, 8)
    words, tile_table, offset = [], [], 0
    for t in range(n_tiles):  # a tile's segments next to each other: one stream per tile
        for s, block in enumerate(blocks):
            tile_table.append([s, offset])
            offset += block[t].numel()
            words.append(block[t].reshape(-1))
    ptr = [t * len(kept) for t in range(n_tiles + 1)]
    scale = torch.where(lanes >= 0, 1.0, 0.0)
    return _assemble(words, seg_table, scales[kept].tolist(), tile_table, ptr, lanes, out_features, in_features, scale)


def _assemble(words, seg_table, seg_scale, tile_table, ptr, lanes, out_features, in_features, row_scale=None):
    n_tiles = len(ptr) - 1 if ptr else 0
    return PackedWeight(
        words=torch.cat(words).to(torch.int32) if words else torch.zeros(0, dtype=torch.int32),
        seg_table=torch.tensor(seg_table, dtype=torch.int64).reshape(-1, 3),
        seg_scale=torch.tensor(seg_scale, dtype=torch.float32),
        tile_table=torch.tensor(tile_table, dtype=torch.int64).reshape(-1, 2),
        tile_ptr=torch.tensor(ptr or [0], dtype=torch.int64),
        rows=(lanes.to(torch.int32) if n_tiles else torch.zeros(0, LANES, dtype=torch.int32)),
        row_scale=(row_scale.to(torch.float32) if n_tiles else torch.zeros(0, LANES)),
        out_features=out_features,
        in_features=in_features,
    )


def to_device(weight: PackedWeight, device: torch.device | str) -> PackedWeight:
    """``weight`` with every tensor on ``device``."""
    moved = (t.to(device) for t in weight.tensors())
    return PackedWeight(*moved, out_features=weight.out_features, in_features=weight.in_features)


def file_bytes(codes: torch.Tensor, scales: torch.Tensor, group_by: str = "output") -> int:
    """Bytes the same codes take densely packed (``sgsc.ops.pack``'s layout, as in the file): the yardstick
    of the layout's overhead."""
    groups = scales.shape[0]
    if groups == 0 or codes.numel() == 0:
        return 0
    codes = codes.detach().cpu()
    grouped = codes.reshape(groups, -1) if group_by == "output" else codes.reshape(codes.shape[0], groups, -1).transpose(0, 1).reshape(groups, -1)
    return int(stream_bytes(minimal_widths(grouped), grouped.shape[1]).sum())


# ---- fake kernels ----------------------------------------------------------------------------


def _check_layout(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale) -> None:
    for name, t, dtype in zip(TENSOR_NAMES, (words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale),
                              _TENSOR_DTYPES):
        torch._check(t.dtype == dtype, lambda name=name, t=t, dtype=dtype: f"{name} must be {dtype}, got {t.dtype}")
    torch._check(seg_table.dim() == 2 and seg_table.shape[1] == 3,
                 lambda: f"seg_table must be (S, 3), got {tuple(seg_table.shape)}")
    torch._check(rows.dim() == 2 and rows.shape[1] == LANES, lambda: f"rows must be (T, 8), got {tuple(rows.shape)}")
    torch._check(tile_ptr.shape[0] == rows.shape[0] + 1,
                 lambda: f"tile_ptr must have one more element than rows has tiles, got {tuple(tile_ptr.shape)}")


@torch.library.register_fake("sgsc::packed_linear")
def _packed_linear_fake(x, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features, bias):
    _check_layout(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale)
    torch._check(x.dtype == torch.float32, lambda: f"x must be float32, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (batch, in_features), got shape {tuple(x.shape)}")
    torch._check(bias is None or tuple(bias.shape) == (out_features,),
                 lambda: f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("sgsc::packed_linear_q8")
def _packed_linear_q8_fake(x, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features, bias):
    return _packed_linear_fake(x, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features, bias)


@torch.library.register_fake("sgsc::packed_dequantize")
def _packed_dequantize_fake(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                            in_features):
    _check_layout(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale)
    return seg_scale.new_empty((out_features, in_features))


@torch.library.register_fake("sgsc::packed_dequantize_out")
def _packed_dequantize_out_fake(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                                in_features, out):
    _check_layout(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale)
    torch._check(out.numel() == out_features * in_features,
                 lambda: f"out must have {out_features * in_features} elements, got shape {tuple(out.shape)}")


# ---- CUDA: the Triton kernel; dequantization by the reference, on the device ---------------


@torch.library.register_kernel("sgsc::packed_linear", "cuda")
def _packed_linear_cuda(x, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features, bias):
    return _triton_module("packed_linear").packed_linear(
        x, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features, bias)


# The weight of a convolution is rebuilt once per call: torch ops on the device move the bytes at
# memory speed, so no kernel of its own is needed there.
torch.library.register_kernel("sgsc::packed_dequantize", "cuda", reference.packed_dequantize)


@torch.library.register_kernel("sgsc::packed_dequantize_out", "cuda")
def _packed_dequantize_out_cuda(*args):
    *layout, out = args
    out.copy_(reference.packed_dequantize(*layout).reshape(out.shape))


# The C++ CPU op checks every layout tensor and index itself on each call (a corrupt layout is an error,
# never a wild read); the reference that stands in for it without the extension does not.
NATIVE_CPU_CHECKS = _native.available()

# the default kernels, as library.py registers them: the CPU without the C++ build, any device without its own
torch.library.register_kernel("sgsc::packed_linear", None, reference.packed_linear)
torch.library.register_kernel("sgsc::packed_linear_q8", None, reference.packed_linear_q8)
torch.library.register_kernel("sgsc::packed_dequantize", None, reference.packed_dequantize)


@torch.library.register_kernel("sgsc::packed_dequantize_out", None)
def _packed_dequantize_out_reference(*args):
    *layout, out = args
    out.copy_(reference.packed_dequantize(*layout).reshape(out.shape))


# ---- public wrappers ---------------------------------------------------------------------------


def check_weight(weight) -> None:
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"weight must be a sgsc.ops.PackedWeight, got {type(weight).__name__}")
    for name, t, dtype in zip(TENSOR_NAMES, weight.tensors(), _TENSOR_DTYPES):
        _check_tensor(f"weight.{name}", t, (dtype,))
        if t.device != weight.device:
            raise ValueError(f"weight.{name} must be on weight.words' device {weight.device}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"weight.{name} must be contiguous")


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
                  activations: str = "float") -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` the dequantized ``weight``, computed from its packed codes.

    ``x`` is float32 ``(..., in_features)`` on ``weight``'s device, any strides (it is made contiguous
    like ``F.linear`` would read it); ``bias`` float32 ``(out_features,)`` or None. On CPU, a fused
    unpack-and-multiply kernel that never writes ``W``, for every batch size (each tile's codes are
    read from memory once per 64 batch rows). On CUDA, a Triton kernel.
    ``activations="float"`` (default): the result equals ``F.linear(x, W, bias)`` within the fp32 bound
    in this module's docstring. ``"int8"``: ``x`` is quantized per block of 480 columns and the codes
    multiply it in integer arithmetic; the result is within :func:`int8_error_bound` of ``F.linear(x, W, bias)``.
    """
    check_weight(weight)
    return linear_on_checked(x, weight.tensors(), weight.out_features, weight.in_features, bias, activations)


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")


def linear_on_checked(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], out_features: int, in_features: int,
                      bias: torch.Tensor | None, activations: str = "float") -> torch.Tensor:
    """:func:`packed_linear` without checking the layout ``tensors`` in Python (a packed layer has them checked
    by the C++ op on CPU, or once in Python elsewhere: those checks cost more than a small layer's product)."""
    _check_tensor("x", x, (torch.float32,))
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}), got {tuple(x.shape)}")
    device = tensors[0].device
    if x.device != device:
        raise ValueError(f"x must be on weight's device {device}, got {x.device}")
    if bias is not None:
        _check_tensor("bias", bias, (torch.float32,))
        if bias.shape != (out_features,) or bias.device != device:
            raise ValueError(f"bias must have shape ({out_features},) on {device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")
        bias = bias.contiguous()
    if activations == "float":
        op = torch.ops.sgsc.packed_linear
    elif activations == "int8":
        op = torch.ops.sgsc.packed_linear_q8
    else:
        check_activations(activations)
    if x.dim() == 2:
        return op(x.contiguous(), *tensors, out_features, bias)
    # reshape(-1, 0) cannot infer the rows of a layer with no inputs (a fully pruned MLP's output layer)
    rows = -1 if in_features else math.prod(x.shape[:-1])
    y = op(x.reshape(rows, in_features).contiguous(), *tensors, out_features, bias)
    return y.view(*x.shape[:-1], out_features)


def int8_error_bound(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """The stated bound of ``activations="int8"`` against ``F.linear(x, W)``, float64 ``(batch, out_features)``
    for ``x`` ``(batch, in_features)``: ``sum_k |W_rk| |x_k - x_hat_k|`` (computed from ``x_hat``) plus the
    fp32 bound of this module's docstring, ``(K + 2) eps 2^W scale_r sum_k |x_hat_k|`` (W: the widest segment)."""
    check_weight(weight)
    t = [t.cpu() for t in weight.tensors()]
    w = reference.packed_dequantize(*t, weight.out_features, weight.in_features).double()
    x = x.detach().cpu().float().reshape(-1, weight.in_features)
    x_hat = reference.quantize_segments(x, t[1]).double()
    row_scale = torch.zeros(weight.out_features, dtype=torch.float64)
    row_scale[t[5][t[5] >= 0].long()] = t[6][t[5] >= 0].double() * float(t[2].max()) if t[2].numel() else 0.0
    top = 2.0 ** float(t[1][:, 2].max()) if t[1].numel() else 0.0
    fp32 = (weight.in_features + 2) * 2.0**-24 * top * x_hat.abs().sum(1, keepdim=True) * row_scale
    return (x.double() - x_hat).abs() @ w.abs().T + fp32


def packed_dequantize(weight: PackedWeight, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 ``(out_features, in_features)`` weight, ``code * scale`` exactly; into ``out`` if given.

    ``out`` (contiguous float32 with ``out_features * in_features`` elements, any shape, on
    ``weight``'s device) is filled in place and returned: a reused buffer spares the allocation.
    """
    check_weight(weight)
    if out is None:
        return torch.ops.sgsc.packed_dequantize(*weight.tensors(), weight.out_features, weight.in_features)
    _check_tensor("out", out, (torch.float32,))
    numel = weight.out_features * weight.in_features
    if out.numel() != numel or out.device != weight.device:
        raise ValueError(f"out must hold {numel} elements on {weight.device}, got shape {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    torch.ops.sgsc.packed_dequantize_out(*weight.tensors(), weight.out_features, weight.in_features, out)
    return out
