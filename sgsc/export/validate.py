"""Checks on a packed file's values and on what loading it would cost, before anything is allocated.

The checksums only say a file is as its writer left it; a crafted file has valid ones. What is
checked here is what docs/FORMAT.md requires of the values themselves: scales that are finite
positive powers of two, finite float state, non-negative running variances, bit-packed runs whose
unused bits are zero, and a model whose tensors fit in the caller's memory bound. Every function
raises :class:`~sgsc.export.format.PackedFileError` naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from sgsc.export import codec
from sgsc.export.format import SCALES, LayerSlot, PackedFileError
from sgsc.ops.spec import stream_bytes

# The default memory bound: a fixed allowance (any small model loads) plus a multiple of the file's
# size. A trained SGSC model expands about 3-30x when loaded (a few bits per weight become 32);
# 256x leaves room for files of mostly pruned groups while refusing a few kilobytes that claim
# gigabytes of all-zero weights.
DEFAULT_ALLOWANCE_BYTES = 64 * 2**20
DEFAULT_EXPANSION = 256
# Decoding one layer holds its int32 codes and their float32 products besides the weight itself.
DECODE_BYTES_PER_WEIGHT = 8

# Building the architecture costs time per tensor however small (about 1 ms per quantized layer, even
# on meta), so a file may build a fixed allowance of tensors (about two per state-dict entry: a
# 16-block decoder, any zoo CNN) plus one per 256 bytes of file, which a trained model's weights pay
# for many times over. The writer checks its files against the same bound.
BUILD_TENSOR_ALLOWANCE = 1024
FILE_BYTES_PER_BUILD_TENSOR = 256


def default_max_bytes(file_bytes: int) -> int:
    return DEFAULT_ALLOWANCE_BYTES + DEFAULT_EXPANSION * file_bytes


def build_budget(file_bytes: int) -> int:
    """Tensors the architecture a file of ``file_bytes`` names may create while it is built."""
    return BUILD_TENSOR_ALLOWANCE + file_bytes // FILE_BYTES_PER_BUILD_TENSOR


def _bytes_of(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def check_footprint(path: Path, slots: list[LayerSlot], weight_dtypes: list[torch.dtype],
                    state: dict[str, tuple[tuple[int, ...], torch.dtype]], max_bytes: int) -> None:
    """Refuse a model whose loaded tensors and largest layer's decoding would exceed ``max_bytes``.

    A pruned group stores no bytes, so a file's size says nothing about its weights' size; their
    shapes, fixed by the config, do.
    """
    weights = sum(_bytes_of(slot.shape, dtype) for slot, dtype in zip(slots, weight_dtypes))
    plain = sum(_bytes_of(shape, dtype) for shape, dtype in state.values())
    decoding = max((slot.numel * DECODE_BYTES_PER_WEIGHT for slot in slots), default=0)
    needed = weights + plain + decoding
    if needed > max_bytes:
        raise PackedFileError(
            f"{path}: loading needs {needed:,} bytes ({weights:,} of weights, {plain:,} of other tensors, "
            f"{decoding:,} to decode the largest layer), over the limit of {max_bytes:,} (max_bytes)")


def check_scales(path: Path, scales: torch.Tensor) -> None:
    """Each group's step is ``2^e`` for the group's learned, real exponent ``e``: finite and positive.

    (Not a power of two: ``e`` is a trained float, and the file stores the step the model used.)
    """
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bad.any():
        g = int(bad.nonzero()[0])
        raise PackedFileError(f"{path}: tensor {SCALES!r}: group {g}'s scale {float(scales[g])!r} is not a finite "
                              "positive number")


def check_state_values(path: Path, key: str, value: torch.Tensor) -> None:
    """Stored float state is finite; running variances are non-negative (their square roots are taken)."""
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise PackedFileError(f"{path}: state entry {key!r} holds NaN or infinite values")
    if key.rpartition(".")[2] == "running_var" and (value < 0).any():
        raise PackedFileError(f"{path}: state entry {key!r} holds a negative variance")


def check_weight_values(path: Path, name: str, weight: torch.Tensor) -> None:
    """``r * 2^e`` can overflow float32, or the dtype the weight is cast to."""
    if not torch.isfinite(weight).all():
        raise PackedFileError(f"{path}: layer {name!r}: a weight overflows to infinity in {weight.dtype}")


def _last_byte_padding_clear(last_bytes: np.ndarray, used_bits: np.ndarray) -> bool:
    """Whether the bits of each run's last byte above its ``used_bits % 8`` (when not 0) are zero."""
    partial = used_bits % 8 != 0
    return not (last_bytes[partial].astype(np.int64) >> (used_bits[partial] % 8)).any()


def check_padding(path: Path, name: str, stream: torch.Tensor, width_bytes: torch.Tensor, group_len: int) -> None:
    """The unused high bits of every bit-packed run's last byte are zero, as FORMAT.md requires.

    A nonzero padding bit changes no weight, so a reader that ignored it would accept many files for
    one model. ``stream`` is the layer's bytes, already checked to hold its parts (the masks' own
    padding is checked by the codec).
    """
    widths, sparse = (part.numpy() for part in codec.split_width_bytes(width_bytes))
    data = stream.cpu().numpy()
    dense_bits = widths[~sparse] * group_len
    dense_ends = np.cumsum(stream_bytes(dense_bits, 1) if len(dense_bits) else dense_bits)
    stored = dense_bits > 0
    clear = _last_byte_padding_clear(data[dense_ends[stored] - 1], dense_bits[stored])
    n_sparse, mask_bytes = int(sparse.sum()), stream_bytes(1, group_len)
    offset = int(dense_ends[-1]) if len(dense_ends) else 0
    masks = data[offset : offset + n_sparse * mask_bytes].reshape(n_sparse, mask_bytes)
    counts = np.unpackbits(masks, axis=1).sum(axis=1)
    offset += n_sparse * mask_bytes
    sparse_widths = widths[sparse]
    for width in np.unique(sparse_widths).tolist():
        bits = width * int(counts[sparse_widths == width].sum())
        offset += stream_bytes(bits, 1)
        clear &= _last_byte_padding_clear(data[offset - 1 : offset], np.array([bits]))
    if not clear:
        raise PackedFileError(f"{path}: tensor 'codes', layer {name!r}: a bit-packed run has nonzero padding bits "
                              "after its last code")
