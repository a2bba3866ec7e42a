"""The public ops: argument checks with messages that name the bad argument, then ``torch.ops.sgsc.*``.

Every check here reads only what is known without a device sync (types, dtypes, shapes, devices),
except the width range of :func:`pack`/:func:`unpack`, which the byte count depends on anyway.
"""

from __future__ import annotations

import torch

from sgsc.ops import library  # noqa: F401 - registers torch.ops.sgsc.*
from sgsc.ops.spec import MAX_WIDTH, ROUNDING_MODES, WEIGHT_DTYPES, WIDTH_DTYPES, group_offsets

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.uint8: "uint8",
                torch.int32: "int32", torch.int64: "int64"}


def _check_tensor(name: str, value, dtypes: tuple[torch.dtype, ...]) -> None:
    """``TypeError`` unless ``value`` is a tensor of one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(_DTYPE_NAMES[d] for d in dtypes[:-1])
        allowed = f"{allowed} or {_DTYPE_NAMES[dtypes[-1]]}" if allowed else _DTYPE_NAMES[dtypes[-1]]
        raise TypeError(f"{name} must be {allowed}, got {value.dtype}")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_out(out, numel: int, dtype: torch.dtype, device: torch.device, what: str) -> None:
    """``out`` must be a contiguous tensor of ``numel`` elements, ``dtype``, on ``device``."""
    _check_tensor("out", out, (dtype,))
    if out.numel() != numel or out.device != device:
        raise ValueError(f"out must hold {numel} elements on {device} ({what}), "
                         f"got shape {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def validate_quantizer_args(w: torch.Tensor, b: torch.Tensor, e: torch.Tensor, rounding: str) -> None:
    """Check everything about the arguments that is known without reading tensor values."""
    _check_tensor("w", w, WEIGHT_DTYPES)
    _check_tensor("b", b, (torch.float32,))
    _check_tensor("e", e, (torch.float32,))
    if w.dim() < 1:
        raise ValueError("w must have at least one dimension (rows are grouped along dim 0)")
    if b.dim() != 1 or b.shape[0] == 0:
        raise ValueError(f"b must be a non-empty 1-D tensor of per-group bit depths, got shape {tuple(b.shape)}")
    if e.shape != b.shape:
        raise ValueError(f"e must have the same shape as b {tuple(b.shape)}, got {tuple(e.shape)}")
    if w.shape[0] % b.shape[0] != 0:
        raise ValueError(f"b has {b.shape[0]} groups, which do not divide w's first dimension {w.shape[0]}")
    if not (w.device == b.device == e.device):
        raise ValueError(f"w, b and e must be on one device, got {w.device}, {b.device} and {e.device}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def fake_quantize(
    w: torch.Tensor,
    b: torch.Tensor,
    e: torch.Tensor,
    *,
    rounding: str = "nearest",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize ``w`` per group of rows with learnable bit depths ``b`` and exponents ``e``.

    ``q = 2^e * round(clamp(2^-e * w, -2^(b-1), 2^(b-1) - 1))`` (eq. 1 of the paper; ``rounding``
    is ``"nearest"``, half to even, or ``"floor"`` as the paper writes it), with ``b`` and ``e`` of
    shape ``(G,)`` and group ``g`` covering rows ``[g*O/G, (g+1)*O/G)`` of ``w``. Groups with
    ``b <= 0`` are pruned to exact zeros. Gradients to ``w``, ``b`` and ``e`` follow the
    straight-through estimator. NaN in ``w`` propagates to ``q``; NaN/Inf in ``b`` or ``e`` is a
    ``ValueError`` on CPU and, on CUDA where checking would cost a device sync, turns that group of
    ``q`` into NaN. ``out`` (no autograd) receives the result in place.
    """
    validate_quantizer_args(w, b, e, rounding)
    if out is None:
        return torch.ops.sgsc.fake_quantize(w, b, e, rounding)
    _check_out(out, w.numel(), w.dtype, w.device, "w's shape and dtype")
    if out.shape != w.shape:
        raise ValueError(f"out must be a tensor with w's shape {tuple(w.shape)}, got {tuple(out.shape)}")
    torch.ops.sgsc.fake_quantize_out(w, b, e, rounding, out)
    return out



def _validate_widths(widths: torch.Tensor) -> None:
    _check_tensor("widths", widths, WIDTH_DTYPES)
    if widths.dim() != 1 or widths.shape[0] == 0:
        raise ValueError(
            f"widths must be a non-empty 1-D tensor of per-group bit widths, got shape {tuple(widths.shape)}"
        )
    if torch.compiler.is_compiling():
        return  # value checks would break the graph; the kernels guard against bad widths themselves
    bad = ((widths < 0) | (widths > MAX_WIDTH)).nonzero()
    if bad.numel():
        group = int(bad[0, 0])
        raise ValueError(f"widths must be in [0, {MAX_WIDTH}], got {int(widths[group])} at group {group}")


def packed_group_offsets(widths: torch.Tensor, group_len: int) -> torch.Tensor:
    """Byte offset of every group's stream in :func:`pack`'s output, as an int64 ``(G + 1,)`` tensor.

    ``offsets[g] = sum_{h < g} ceil(widths[h] * group_len / 8)`` and ``offsets[G]`` is the total
    size, so group ``g``'s stream is ``packed[offsets[g]:offsets[g + 1]]`` (empty for width 0).
    ``group_len`` is the number of codes per group, ``ints.numel() // G``. On ``widths``' device.
    """
    _validate_widths(widths)
    _check_count("group_len", group_len)
    return group_offsets(widths, group_len)


def pack(ints: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Store integer codes with one bit width per group, densely, in a uint8 byte stream.

    ``ints`` is an int32 tensor of shape ``(O, ...)`` grouped along dim 0 like the weights of
    :func:`fake_quantize`: with ``G = widths.numel()`` groups, group ``g`` is the contiguous run of
    ``L = ints.numel() / G`` codes holding rows ``[g*O/G, (g+1)*O/G)``. ``widths`` (uint8, int32 or
    int64, shape ``(G,)``, on ``ints``' device) gives each group's width ``w`` in ``[0, 32]``; every
    code must lie in ``[-2^(w-1), 2^(w-1) - 1]`` (only 0 for ``w = 0``), otherwise a ``ValueError``
    names the group. Returns a 1-D uint8 tensor of ``sum_g ceil(w_g * L / 8)`` bytes.

    Layout:

    * Group streams follow each other in group order; group ``g``'s stream starts on a byte
      boundary at ``packed_group_offsets(widths, L)[g]`` and is ``ceil(w_g * L / 8)`` bytes long.
      A group of width 0 is pruned and stores nothing.
    * Within a stream, code ``i`` occupies bits ``[i*w, (i+1)*w)`` with the low ``w`` bits of its
      two's complement, least significant bit first; stream bit ``k`` is bit ``k % 8`` (value
      ``2^(k % 8)``) of the stream's byte ``k // 8``. No padding between codes; the unused high bits
      of a group's last byte are zero.

    Worked example (pinned in ``tests/test_bitpack.py``): ``widths = [3, 0, 5]``,
    ``ints = [[1, -2], [0, 0], [-16, 13]]`` (``L = 2``)::

        group 0, w=3:  1 -> 001, -2 -> 110        stream bits 0..5 = 1,0,0 | 0,1,1
                       byte 0 = 0b00_110_001 = 0x31
        group 1, w=0:  nothing stored
        group 2, w=5:  -16 -> 10000, 13 -> 01101  stream bits 0..9 = 0,0,0,0,1 | 1,0,1,1,0
                       byte 0 = 0b101_10000 = 0xB0, byte 1 = 0b0000000_1 = 0x01
        packed  = [0x31, 0xB0, 0x01]
        offsets = packed_group_offsets(widths, 2) = [0, 1, 1, 3]

    On CPU this runs the C++ kernel (parallel over blocks of codes), on CUDA the Triton kernel,
    which needs one device sync for the output size and the range check.
    """
    _check_tensor("ints", ints, (torch.int32,))
    _validate_widths(widths)
    if ints.dim() < 1:
        raise ValueError("ints must have at least one dimension (rows are grouped along dim 0)")
    if ints.shape[0] % widths.shape[0] != 0:
        raise ValueError(
            f"widths has {widths.shape[0]} groups, which do not divide ints' first dimension {ints.shape[0]}"
        )
    if ints.device != widths.device:
        raise ValueError(f"ints and widths must be on one device, got {ints.device} and {widths.device}")
    return torch.ops.sgsc.pack(ints, widths)


def unpack(
    packed: torch.Tensor,
    widths: torch.Tensor,
    rows_per_group: int,
    row_len: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`pack`: the int32 codes, shape ``(G * rows_per_group, row_len)``.

    ``rows_per_group * row_len`` is the group length ``L`` that :func:`pack` saw; reshape the result
    to the original ``(O, ...)`` shape (``O = G * rows_per_group``). ``packed`` must be the 1-D uint8
    stream of exactly ``packed_group_offsets(widths, L)[-1]`` bytes, on ``widths``' device. Codes
    come back sign-extended; groups of width 0 are all zeros. ``out``, a contiguous int32 tensor of
    any shape with ``G * L`` elements (the original ``(O, ...)`` shape, say), receives the codes in
    place and is returned; reusing it skips allocating (and first touching) a fresh output.
    """
    _check_tensor("packed", packed, (torch.uint8,))
    _validate_widths(widths)
    _check_count("rows_per_group", rows_per_group)
    _check_count("row_len", row_len)
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
    if packed.device != widths.device:
        raise ValueError(f"packed and widths must be on one device, got {packed.device} and {widths.device}")
    # The stream's size depends on the values of widths; under torch.compile the kernel checks it.
    expected = packed.numel()
    if not torch.compiler.is_compiling():
        expected = int(packed_group_offsets(widths, rows_per_group * row_len)[-1])
    if packed.numel() != expected:
        raise ValueError(
            f"packed must hold {expected} bytes for these widths and rows_per_group * row_len = "
            f"{rows_per_group * row_len} codes per group, got {packed.numel()}"
        )
    if out is None:
        return torch.ops.sgsc.unpack(packed, widths, rows_per_group, row_len)
    _check_out(out, widths.shape[0] * rows_per_group * row_len, torch.int32, packed.device, "the unpacked codes")
    torch.ops.sgsc.unpack_out(packed, widths, rows_per_group, row_len, out)
    return out

