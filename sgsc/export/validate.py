"""Checks on a packed file's values and on what loading it would cost, before anything is allocated.

The checksums only say a file is as its writer left it; a crafted file has valid ones. What is
checked here is what docs/FORMAT.md requires of the values themselves: finite positive scales,
weights finite as both runtimes compute them, finite float state, bools stored as 0 or 1,
non-negative running variances, biases in their weights' dtype, bit-packed runs whose unused bits
are zero, and a model whose tensors fit in the caller's memory bound and whose layers in its time
bound. Every function raises :class:`~sgsc.export.format.PackedFileError` naming the file.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from sgsc.export import codec
from sgsc.export.format import SCALES, LayerSlot, PackedFileError, dtype_name, quoted, state_key
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


def check_layer_count(path: Path, layers: int, file_bytes: int) -> None:
    """A version 4 record lists at most as many quantized layers as a zoo file of its size may build tensors.

    It builds nothing, but each layer costs reading and loading it time of its own however small its tensors
    (decoding, quantizing the caller's layer, putting a runtime layer in its place), so a record of many
    tiny layers would take time out of all proportion to its size.
    """
    budget = build_budget(file_bytes)
    if layers > budget:
        raise PackedFileError(f"{path}: header 'architecture' lists {layers:,} quantized layers, more than the "
                              f"{budget:,} a file of {file_bytes:,} bytes may (docs/FORMAT.md, limits)")


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
    limit = min(max_bytes, sys.maxsize)  # torch sizes memory in int64, whatever max_bytes allows
    if needed > limit:
        raise PackedFileError(
            f"{path}: loading needs {needed:,} bytes ({weights:,} of weights, {plain:,} of other tensors, "
            f"{decoding:,} to decode the largest layer), over the limit of {limit:,} "
            f"({'max_bytes' if limit == max_bytes else 'the most an int64 counts'})")


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
        raise PackedFileError(f"{path}: state entry {quoted(key)} holds NaN or infinite values")
    # torch reads a bool byte other than 0 or 1 inconsistently (true to one op, neither to another)
    if value.dtype == torch.bool and (value.view(torch.uint8) > 1).any():
        raise PackedFileError(f"{path}: state entry {quoted(key)} holds a bool byte that is neither 0 nor 1")
    if key.rpartition(".")[2] == "running_var" and (value < 0).any():
        raise PackedFileError(f"{path}: state entry {quoted(key)} holds a negative variance")


def check_weight_range(path: Path, name: str, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
    """Every weight ``code * scale`` of a layer's ``(G, L)`` codes is finite in ``dtype``, as both runtimes compute it.

    The float runtime holds :func:`~sgsc.export.codec.dequantize`'s weights; the packed runtime multiplies in
    float32 too (and runs float32 layers only). Each step rounds monotonically, so in each group the code of
    largest magnitude decides, and checking it alone accepts exactly the files whose every weight is finite.
    The magnitude is taken in int64: int32's ``abs(-2^31)`` wraps to ``-2^31``, which would pass any bound.
    """
    if codes.numel() == 0:
        return
    low, high = torch.aminmax(codes, dim=1)
    magnitude = torch.maximum(high.to(torch.int64), -low.to(torch.int64))  # widened after the reduction: no int64 copy
    finite = torch.isfinite(codec.dequantize(magnitude.unsqueeze(1), scales, dtype)).flatten()
    if not finite.all():
        g = int((~finite).nonzero()[0])
        raise PackedFileError(f"{path}: layer {quoted(name)}: a weight overflows to infinity in {dtype_name(dtype)} "
                              f"(group {g}: a code of magnitude {int(magnitude[g])} times the scale "
                              f"{float(scales[g])!r})")


def check_layer_dtypes(path: Path, layers, dtypes: dict[str, torch.dtype]) -> None:
    """Each quantized layer of ``layers`` (names) has its bias, if any, in its weight's dtype (``dtypes``: every
    entry's stored dtype).

    ``F.linear`` and ``F.conv2d`` refuse a bias of another dtype, while the packed runtime casts its bias to
    float32: without this rule the packed runtime would run a model that the float runtime cannot.
    """
    for name in layers:
        weight, bias = dtypes[state_key(name, "weight")], dtypes.get(state_key(name, "bias"))
        if bias is not None and bias != weight:
            raise PackedFileError(f"{path}: layer {quoted(name)}: its bias is {dtype_name(bias)} and its weight "
                                  f"{dtype_name(weight)}; a layer computes in one dtype")


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
        raise PackedFileError(f"{path}: tensor 'codes', layer {quoted(name)}: a bit-packed run has nonzero padding "
                              "bits after its last code")
