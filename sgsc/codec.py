"""One quantized layer's integer codes as bytes: each group dense or sparse, whichever is smaller.

A *dense* group stores all of its ``L`` codes at its width ``w`` (``sgsc.ops.pack``):
``ceil(w * L / 8)`` bytes. A *sparse* group stores a bitmask of its nonzero codes (``ceil(L / 8)``
bytes) followed by only those codes at width ``w``: ``ceil(w * nnz / 8)`` bytes. Magnitude pruning
leaves most codes of a layer zero, and a low-bit layer rounds many small weights to zero; sparse
groups store those zeros in one bit each instead of ``w``.

Each group's width byte says which: the low six bits are the width (0..32), bit 7 marks a sparse
group. A layer's stream holds its dense groups first (one ``ops.pack`` stream over them, in group
order), then each sparse group's mask and codes, in group order. docs/FORMAT.md specifies the bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from sgsc import ops

SPARSE_FLAG = 0x80
WIDTH_BITS = 0x3F
MAX_WIDTH = 32


class CodecError(ValueError):
    """Width bytes or a code stream that no encoder writes (the caller names the file and layer)."""


def _ceil_bytes(bits: torch.Tensor | int):
    return (bits + 7) // 8


def encode(codes: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream and width bytes of ``codes`` (``(G, L)`` integers) stored at ``widths`` (``(G,)``).

    Every code must fit its group's width (two's complement). Returns a 1-D uint8 stream and uint8
    width bytes, with the sparse flag set on each group that the sparse form stores in fewer bytes.
    """
    codes, widths = codes.cpu(), widths.cpu().to(torch.int64)
    groups, group_len = codes.shape
    nonzero = codes != 0
    dense_bytes = _ceil_bytes(widths * group_len)
    sparse_bytes = _ceil_bytes(group_len) + _ceil_bytes(widths * nonzero.sum(dim=1))
    sparse = (widths > 0) & (sparse_bytes < dense_bytes)
    parts = []
    dense = (~sparse).nonzero().flatten()
    if dense.numel():
        parts.append(ops.pack(codes[dense].to(torch.int32), widths[dense].to(torch.uint8)))
    for g in sparse.nonzero().flatten().tolist():
        mask = np.packbits(nonzero[g].numpy(), bitorder="little")
        values = codes[g][nonzero[g]].to(torch.int32).reshape(1, -1)
        parts += [torch.from_numpy(mask), ops.pack(values, widths[g : g + 1].to(torch.uint8))]
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return stream, (widths | sparse.to(torch.int64) * SPARSE_FLAG).to(torch.uint8)


def check_width_bytes(width_bytes: torch.Tensor, *, sparse_allowed: bool = True) -> None:
    """Raise :class:`CodecError` unless every byte is a width 0..32, or 1..32 with the sparse flag."""
    values = width_bytes.cpu().to(torch.int64)
    widths, sparse = split_width_bytes(width_bytes)
    bad = (values & ~(WIDTH_BITS | SPARSE_FLAG) != 0) | (widths > MAX_WIDTH) | (sparse & (widths == 0))
    if not sparse_allowed:
        bad |= sparse
    if bad.any():
        g = int(bad.nonzero()[0])
        raise CodecError(f"width byte {int(values[g])} of group {g} is not a width 0..{MAX_WIDTH}"
                         + (" or a sparse width 1..32 (bit 7 set)" if sparse_allowed else ""))


def split_width_bytes(width_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's width (int64, on the CPU) and whether it is stored sparse."""
    values = width_bytes.cpu().to(torch.int64)
    return values & WIDTH_BITS, (values & SPARSE_FLAG) != 0


def _dense_length(widths: torch.Tensor, sparse: torch.Tensor, group_len: int) -> int:
    return int(_ceil_bytes(widths[~sparse] * group_len).sum())


def _sparse_group(stream: torch.Tensor, start: int, width: int, group_len: int) -> tuple[np.ndarray, int]:
    """The nonzero mask of the sparse group at ``start`` and where its codes end."""
    mask_end = start + _ceil_bytes(group_len)
    if mask_end > stream.numel():
        raise CodecError(f"a sparse group's mask runs past the end of the stream ({stream.numel()} bytes)")
    mask_bytes = stream[start:mask_end].numpy()
    mask = np.unpackbits(mask_bytes, bitorder="little")
    if mask[group_len:].any():
        raise CodecError("a sparse group's mask has bits set past the group's last code")
    mask = mask[:group_len].astype(bool)
    end = mask_end + _ceil_bytes(width * int(mask.sum()))
    if end > stream.numel():
        raise CodecError(f"a sparse group's codes run past the end of the stream ({stream.numel()} bytes)")
    return mask, end


def stream_length(stream: torch.Tensor, start: int, width_bytes: torch.Tensor, group_len: int) -> int:
    """Bytes of the layer stream that begins at ``stream[start]``: sparse groups' masks say how many."""
    widths, sparse = split_width_bytes(width_bytes)
    end = start + _dense_length(widths, sparse, group_len)
    if end > stream.numel():
        raise CodecError(f"the dense groups need {end - start} bytes, past the end of the stream")
    for g in sparse.nonzero().flatten().tolist():
        _, end = _sparse_group(stream, end, int(widths[g]), group_len)
    return end - start


def decode(stream: torch.Tensor, width_bytes: torch.Tensor, rows_per_group: int, row_len: int) -> torch.Tensor:
    """Inverse of :func:`encode`: the int32 codes, shape ``(G * rows_per_group, row_len)``, on ``stream``'s device.

    ``stream`` must be exactly the layer's bytes (see :func:`stream_length`).
    """
    device, group_len = stream.device, rows_per_group * row_len
    widths, sparse = split_width_bytes(width_bytes)
    groups = widths.numel()
    if not sparse.any():
        return ops.unpack(stream, widths.to(torch.uint8).to(device), rows_per_group, row_len)
    codes = torch.zeros(groups, group_len, dtype=torch.int32, device=device)
    dense = (~sparse).nonzero().flatten()
    offset = _dense_length(widths, sparse, group_len)
    if dense.numel():
        dense_widths = widths[dense].to(torch.uint8).to(device)
        codes[dense.to(device)] = ops.unpack(stream[:offset], dense_widths, 1, group_len)
    host = stream.cpu()
    for g in sparse.nonzero().flatten().tolist():
        mask, end = _sparse_group(host, offset, int(widths[g]), group_len)
        mask_end = offset + _ceil_bytes(group_len)
        values = ops.unpack(host[mask_end:end], widths[g : g + 1].to(torch.uint8), 1, int(mask.sum())).flatten()
        if (values == 0).any():
            raise CodecError(f"sparse group {g} stores a zero among its nonzero codes")
        codes[g, torch.from_numpy(mask).to(device)] = values.to(device)
        offset = end
    if offset != stream.numel():
        raise CodecError(f"the layer's groups take {offset} bytes, the stream has {stream.numel()}")
    return codes.reshape(groups * rows_per_group, row_len)
