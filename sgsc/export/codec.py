"""One quantized layer's integer codes as bytes: each group dense or sparse, whichever is smaller.

A *dense* group stores all of its ``L`` codes at its width ``w``: ``ceil(w * L / 8)`` bytes. A
*sparse* group stores a bitmask of its nonzero codes (``ceil(L / 8)`` bytes) and only those codes,
at width ``w``. Magnitude pruning leaves most codes of a layer zero, and a low-bit layer rounds many
small weights to zero; sparse groups store those zeros in one bit each instead of ``w``.

Each group's width byte says which: the low six bits are the width (0..32), bit 7 marks a sparse
group. A layer's stream holds, in this order: its dense groups (one ``ops.pack`` run over them);
the masks of its sparse groups; and for each width its sparse groups use, in ascending order, one
run of their nonzero codes at that width. Every part is one whole-array call (``ops.pack``,
``numpy.packbits``, and the ``sgsc::nonzero_select``/``nonzero_expand`` kernels that gather and place
the nonzero codes), so the cost does not grow with the number of groups. docs/FORMAT.md specifies
the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sgsc import ops
from sgsc.ops.spec import MAX_WIDTH, minimal_widths, stream_bytes  # noqa: F401 - minimal_widths: part of the codec's API

SPARSE_FLAG = 0x80
WIDTH_BITS = 0x3F


class CodecError(ValueError):
    """Width bytes or a code stream that no encoder writes (the caller names the file and layer)."""


def _mask_bytes(group_len: int) -> int:
    """A sparse group's bitmask: one bit per code."""
    return stream_bytes(1, group_len)


def _width_parts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (values & WIDTH_BITS).astype(np.int64), (values & SPARSE_FLAG) != 0


def split_width_bytes(width_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's width (int64, on the CPU) and whether it is stored sparse."""
    return tuple(map(torch.from_numpy, _width_parts(width_bytes.cpu().numpy())))


def check_width_bytes(width_bytes: torch.Tensor, *, sparse_allowed: bool = True) -> None:
    """Raise :class:`CodecError` unless every byte is a width 0..32, or 1..32 with the sparse flag."""
    values = width_bytes.cpu().numpy()
    widths, sparse = _width_parts(values)
    bad = (values & (0xFF & ~(WIDTH_BITS | SPARSE_FLAG)) != 0) | (widths > MAX_WIDTH) | (sparse & (widths == 0))
    if not sparse_allowed:
        bad |= sparse
    if bad.any():
        g = int(np.flatnonzero(bad)[0])
        raise CodecError(f"width byte {int(values[g])} of group {g} is not a width 0..{MAX_WIDTH}"
                         + (" or a sparse width 1..32 (bit 7 set)" if sparse_allowed else ""))


def encode(codes: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream and width bytes of ``codes`` (``(G, L)`` integers) stored at ``widths`` (``(G,)``).

    Every code must fit its group's width (two's complement). Returns a 1-D uint8 stream and uint8
    width bytes, with the sparse flag set on each group whose mask and nonzero codes take fewer bytes
    than its dense run.
    """
    # the bool work runs in NumPy: torch's bool sums are 5-10x slower on CPU
    codes, widths = codes.cpu().to(torch.int32), widths.cpu().to(torch.int64)
    group_len = codes.shape[1]
    values = codes.numpy()
    nonzero = values != 0
    counts = torch.from_numpy(np.count_nonzero(nonzero, axis=1))
    dense_bytes = stream_bytes(widths, group_len)
    sparse_bytes = _mask_bytes(group_len) + stream_bytes(widths, counts)
    # an all-zero group belongs at width 0; given a wider one it stays dense, so every mask has a bit set
    sparse = (counts > 0) & (sparse_bytes < dense_bytes)
    # indexing copies every code, so a layer with no sparse group packs its codes as they are
    dense_codes, dense_widths = (codes[~sparse], widths[~sparse]) if sparse.any() else (codes, widths)
    parts = [ops.pack(dense_codes, dense_widths.to(torch.uint8))] if len(dense_widths) else []
    if sparse.any():
        parts.append(torch.from_numpy(np.packbits(nonzero[sparse.numpy()], axis=1, bitorder="little").reshape(-1)))
        for width in torch.unique(widths[sparse]).tolist():
            rows = (sparse & (widths == width)).nonzero().flatten()
            nonzero_codes = torch.ops.sgsc.nonzero_select(codes, rows)  # group, then code order
            parts.append(ops.pack(nonzero_codes.reshape(1, -1), torch.tensor([width], dtype=torch.uint8)))
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return stream, (widths | sparse.to(torch.int64) * SPARSE_FLAG).to(torch.uint8)


_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.int64)


@dataclass
class _Layout:
    """Where the parts of one layer's stream lie, relative to its start."""

    widths: np.ndarray  # (G,) int64
    sparse: np.ndarray  # (G,) bool
    dense_end: int
    masks: np.ndarray  # (sparse groups, ceil(L / 8)) uint8, as stored
    runs: list[tuple[int, np.ndarray, int, int, int]]  # (width, its sparse groups among masks' rows, codes, start, end)
    end: int


def _runs_bytes(widths: np.ndarray, group_len: int) -> int:
    """Bytes of one run of ``group_len`` codes at each of ``widths``, in Python ints: a file's shapes may make
    ``width * group_len`` wrap in int64, into a small length that a short stream would pass."""
    counts = np.bincount(widths, minlength=MAX_WIDTH + 1).tolist()
    return sum(count * stream_bytes(width, group_len) for width, count in enumerate(counts) if count)


# The layout is worked out in NumPy and Python ints: a layer's groups are few, and torch's per-op cost
# (microseconds) would make it the bulk of reading a file of many small layers.
def _layout(stream: torch.Tensor, start: int, width_bytes: torch.Tensor, group_len: int) -> _Layout:
    check_width_bytes(width_bytes)  # decode hands the dense widths to the unpack op unchecked
    widths, sparse = _width_parts(width_bytes.cpu().numpy())
    available = stream.numel() - start
    dense_end = _runs_bytes(widths[~sparse], group_len)
    if dense_end > available:
        raise CodecError(f"the dense groups need {dense_end} bytes, past the end of the stream")
    n_sparse = int(np.count_nonzero(sparse))
    mask_bytes = _mask_bytes(group_len) * n_sparse
    if dense_end + mask_bytes > available:
        raise CodecError(f"the sparse groups' masks run past the end of the stream ({stream.numel()} bytes)")
    masks = stream[start + dense_end : start + dense_end + mask_bytes].cpu().numpy().reshape(n_sparse, _mask_bytes(group_len))
    if group_len % 8 and (masks[:, -1] >> (group_len % 8)).any():
        raise CodecError("a sparse group's mask has bits set past the group's last code")
    counts = _POPCOUNT[masks].sum(axis=1)
    if not counts.all():
        raise CodecError("a sparse group's mask has no bit set (an all-zero group is stored at width 0)")
    runs, offset = [], dense_end + mask_bytes
    sparse_widths = widths[sparse]
    for width in np.unique(sparse_widths).tolist():
        rows = sparse_widths == width
        count = int(counts[rows].sum())
        length = stream_bytes(width, count)
        runs.append((width, rows, count, offset, offset + length))
        offset += length
    if offset > available:
        raise CodecError(f"the sparse groups' codes run past the end of the stream ({stream.numel()} bytes)")
    return _Layout(widths, sparse, dense_end, masks, runs, offset)


def stream_length(stream: torch.Tensor, start: int, width_bytes: torch.Tensor, group_len: int) -> int:
    """Bytes of the layer stream that begins at ``stream[start]``: the sparse groups' masks say how many."""
    return _layout(stream, start, width_bytes, group_len).end


def decode(stream: torch.Tensor, width_bytes: torch.Tensor, rows_per_group: int, row_len: int) -> torch.Tensor:
    """Inverse of :func:`encode`: the int32 codes, shape ``(G * rows_per_group, row_len)``, on ``stream``'s device.

    ``stream`` must be exactly the layer's bytes (see :func:`stream_length`).
    """
    group_len = rows_per_group * row_len
    layout = _layout(stream, 0, width_bytes, group_len)
    if layout.end != stream.numel():
        raise CodecError(f"the layer's groups take {layout.end} bytes, the stream has {stream.numel()}")
    shape = (layout.widths.size * rows_per_group, row_len)
    if layout.sparse.all():  # nothing to unpack densely
        return _sparse_codes(stream.cpu(), layout, group_len).to(stream.device).reshape(shape)
    # Dense groups unpack in place: with the sparse groups' widths taken as 0 (no bytes, all-zero codes),
    # the dense run is exactly the unpack op's layout for the whole layer. The layout has checked the
    # widths and the run's length, which ops.unpack would check again at several times the op's cost.
    dense_widths = torch.from_numpy(np.where(layout.sparse, 0, layout.widths).astype(np.uint8)).to(stream.device)
    codes = torch.ops.sgsc.unpack(stream[: layout.dense_end], dense_widths, 1, group_len)
    if layout.sparse.any():
        sparse_rows = torch.from_numpy(np.flatnonzero(layout.sparse)).to(stream.device)
        codes[sparse_rows] = _sparse_codes(stream.cpu(), layout, group_len).to(stream.device)
    return codes.reshape(shape)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights of ``(G, L)`` integer codes, row ``g`` times ``scales[g]``: computed in float32 and cast to
    ``dtype`` (docs/FORMAT.md), as the float runtime holds them."""
    return (codes.to(torch.float32) * scales.to(codes.device).unsqueeze(1)).to(dtype)


def _sparse_codes(host_stream: torch.Tensor, layout: _Layout, group_len: int) -> torch.Tensor:
    """The sparse groups' codes, ``(sparse groups, L)`` int32: each width's run expanded at its masks' bits."""
    blocks = []
    for width, rows, count, start, end in layout.runs:
        values = ops.unpack(host_stream[start:end], torch.tensor([width], dtype=torch.uint8), 1, count).reshape(-1)
        if not values.all():
            raise CodecError(f"the width-{width} run of sparse codes holds a zero, where only nonzero codes belong")
        blocks.append((rows, torch.ops.sgsc.nonzero_expand(torch.from_numpy(layout.masks[rows]), values, group_len)))
    if len(blocks) == 1:  # one width: its block is every sparse group, in order
        return blocks[0][1]
    codes = torch.empty(len(layout.masks), group_len, dtype=torch.int32)
    for rows, block in blocks:
        codes[torch.from_numpy(rows)] = block
    return codes
