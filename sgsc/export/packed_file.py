"""Reading a packed file: the header checked first, with every bound on what it describes, then every
stream against the header and the architecture; each layer's codes decoded and checked by the one check
that both runtimes and inspection call (:func:`checked_codes`)."""

from __future__ import annotations

import dataclasses
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from sgsc.export import codec, record, validate
from sgsc.export.architecture import ArchitectureTooLarge, rebuild_on_meta
from sgsc.export.format import (
    CODES,
    HEADER_CRC_TENSOR,
    SCALES,
    WIDTHS,
    LayerSlot,
    PackedFileError,
    check_crcs,
    checked_header,
    dtype_name,
    index_length,
    layer_slots,
    parse_index,
    plain_state,
    quoted,
    quoted_names,
    state_key,
    state_stream,
    stored_dtype,
    unreadable,
)
from sgsc.nn import quantized_layers


@dataclass
class PackedFile:
    """A packed file read and checked against its header and the architecture it names."""

    header: dict
    file_bytes: int
    architecture: nn.Module | None  # a zoo model on the meta device, which the loader fills; None for a record
    slots: list[LayerSlot]
    state_dtypes: dict[str, torch.dtype]  # plain state-dict entry -> its stored dtype, in stream order
    state_shapes: dict[str, tuple[int, ...]]
    weight_dtypes: list[torch.dtype]  # each stored layer's dequantized dtype
    record: record.Record | None = None  # a version 4 file's architecture record
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # once the whole file is read
    code_spans: list[slice] = dataclasses.field(default_factory=list)  # each layer's bytes of ``codes``, once checked


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no packed model file there")
    return path.open("rb")


def _read_head(path: Path, handle, file_bytes: int) -> tuple[dict, list[tuple[int, bytes]]]:
    """The checked sgsc header of the file of ``file_bytes`` open at ``handle`` (at its start), and the
    ``(offset, bytes)`` it was checked from: the safetensors header and the 8 bytes of the header's checksum
    tensor, all that is read."""
    head = handle.read(8)
    head += handle.read(index_length(path, head, file_bytes))
    index = parse_index(path, head, file_bytes)
    read, stored_crc = [(0, head)], None
    entry = index.get(HEADER_CRC_TENSOR)
    if entry is not None and entry["dtype"] == "I64" and entry["shape"] == [1]:  # parse_index: its bytes are there
        handle.seek(len(head) + entry["data_offsets"][0])
        read.append((len(head) + entry["data_offsets"][0], handle.read(8)))
        stored_crc = torch.tensor([int.from_bytes(read[-1][1], "little", signed=True)])
    return checked_header(path, index.get("__metadata__") or {}, stored_crc), read


def _read_tensors(path: Path, data: bytes, header: dict, read: list[tuple[int, bytes]]) -> dict[str, torch.Tensor]:
    """The tensors (CRCs checked) of a file's bytes ``data``, whose ``header`` was checked from the ``read`` parts."""
    if any(data[offset : offset + len(part)] != part for offset, part in read):
        raise PackedFileError(f"{path}: the file changed while it was read")
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise unreadable(path, exc) from exc
    del tensors[HEADER_CRC_TENSOR]  # checked with the header
    check_crcs(path, header["crc32"], tensors)
    return tensors


def _rebuild(path: Path, header: dict, file_bytes: int) -> nn.Module:
    try:
        return rebuild_on_meta(header["model"], header["config"], max_tensors=validate.build_budget(file_bytes))
    except ArchitectureTooLarge as exc:
        raise PackedFileError(f"{path}: model {quoted(header['model'])}: {exc}, the most a file of {file_bytes:,} "
                              "bytes may build (docs/FORMAT.md, limits)") from None
    # the zoo's configs check their fields; a value that passes them can still fail in torch (an
    # int64 overflow of a shape), and every such failure means this config does not rebuild
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise PackedFileError(f"{path}: cannot rebuild model {quoted(header['model'])} from the header's config: "
                              f"{quoted(str(exc))}") from None


def _check_max_bytes(max_bytes) -> None:
    if max_bytes is not None and type(max_bytes) is not int:
        raise TypeError(f"max_bytes must be an int or None, got {type(max_bytes).__name__}")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be non-negative, got {max_bytes}")


def read_packed(path: Path, max_bytes: int | None = None, data: bytes | None = None) -> PackedFile:
    """Read and check every part of a packed file, or of its bytes ``data`` when given (``path`` then names it).

    The header is read and checked first, with every bound on what it describes: the model must fit in
    ``max_bytes`` (default :func:`~sgsc.export.validate.default_max_bytes` of the file's size) and the
    tensors the file's size. Only then is the rest of the file read, so a file of any size with a bad header
    is refused at the cost of its header.
    """
    _check_max_bytes(max_bytes)
    with _open(path) if data is None else io.BytesIO(data) as handle:
        file_bytes = handle.seek(0, os.SEEK_END)
        handle.seek(0)
        header, read = _read_head(path, handle, file_bytes)
        packed_file = _describe(path, header, file_bytes)
        validate.check_footprint(path, packed_file.slots, packed_file.weight_dtypes, {
            key: (packed_file.state_shapes[key], dtype) for key, dtype in packed_file.state_dtypes.items()
        }, validate.default_max_bytes(file_bytes) if max_bytes is None else max_bytes)
        if data is None:
            handle.seek(0)
            data = handle.read(file_bytes)  # one read: every check below sees the same bytes
    packed_file.tensors = _read_tensors(path, data, header, read)
    packed_file.code_spans = _check_streams(path, packed_file)
    validate.check_scales(path, packed_file.tensors[SCALES])
    for key, value in _plain_entries(packed_file):
        validate.check_state_values(path, key, value)
    return packed_file


def _describe(path: Path, header: dict, file_bytes: int) -> PackedFile:
    """What the header says each stream holds: a version 4 file's record, or the zoo architecture it names."""
    if "architecture" in header:  # nothing to build: the record gives every shape
        return _describe_record(path, header, record.parse(path, header["architecture"]), file_bytes)
    return _describe_zoo(path, header, _rebuild(path, header, file_bytes), file_bytes)


def _describe_zoo(path: Path, header: dict, rebuilt: nn.Module, file_bytes: int) -> PackedFile:
    """What the rebuilt architecture says each stream holds: layers, plain entries and their stored dtypes."""
    plain = plain_state(rebuilt)
    layers = dict(quantized_layers(rebuilt))
    unknown = set(header.get("dtypes", {})) - set(plain) - {state_key(name, "weight") for name in layers}
    if unknown:  # bits and exponents are not stored
        raise PackedFileError(f"{path}: the header gives dtypes for {quoted_names(sorted(unknown))}, which the file "
                              "does not store")
    state_dtypes = {key: stored_dtype(path, header, key, value.dtype) for key, value in plain.items()}
    dtypes = dict(state_dtypes)
    for name, layer in layers.items():
        key = state_key(name, "weight")
        dtypes[key] = stored_dtype(path, header, key, layer.weight.dtype)
    validate.check_layer_dtypes(path, layers, dtypes)
    slots = layer_slots(rebuilt)
    return PackedFile(header, file_bytes, rebuilt, slots, state_dtypes,
                      {key: tuple(value.shape) for key, value in plain.items()},
                      [dtypes[state_key(slot.name, "weight")] for slot in slots])


def _describe_record(path: Path, header: dict, recorded: record.Record, file_bytes: int) -> PackedFile:
    """What a version 4 file's record says each stream holds."""
    validate.check_layer_count(path, len(recorded.layers), file_bytes)
    validate.check_layer_dtypes(path, [layer.name for layer in recorded.layers],
                                {key: dtype for key, (_, dtype) in recorded.state.items()})
    plain = recorded.plain()
    return PackedFile(header, file_bytes, None, recorded.slots(), {key: dtype for key, (_, dtype) in plain.items()},
                      {key: shape for key, (shape, _) in plain.items()},
                      [recorded.state[layer.key("weight")][1] for layer in recorded.stored_layers()], recorded)


def _check_stream(path: Path, tensors: dict, stream: str, dtype: torch.dtype, length: int) -> None:
    tensor = tensors.get(stream)
    if tensor is None:
        raise PackedFileError(f"{path}: tensor {stream!r} is missing")
    if tensor.dtype != dtype or tensor.shape != (length,):
        raise PackedFileError(
            f"{path}: tensor {stream!r} must be {dtype_name(dtype)} of shape ({length},) for this architecture, "
            f"got {dtype_name(tensor.dtype)} {tuple(tensor.shape)}"
        )


def _check_streams(path: Path, packed_file: PackedFile) -> list[slice]:
    """Check every stream against the architecture; returns where each layer's bytes lie in ``codes``."""
    tensors, slots = packed_file.tensors, packed_file.slots
    groups = sum(slot.groups for slot in slots)
    _check_stream(path, tensors, WIDTHS, torch.uint8, groups)
    _check_stream(path, tensors, SCALES, torch.float32, groups)
    try:
        codec.check_width_bytes(tensors[WIDTHS], sparse_allowed=packed_file.header["version"] >= 3)
    except codec.CodecError as exc:
        raise PackedFileError(f"{path}: {WIDTHS!r}: {exc}") from None
    code_spans = _code_spans(path, tensors, slots)
    _check_stream(path, tensors, CODES, torch.uint8, code_spans[-1].stop if slots else 0)
    for slot, span in zip(slots, code_spans):  # once every layer is in place: a misplaced one is named as such
        if slot.groups:
            validate.check_padding(path, slot.name, tensors[CODES][span], tensors[WIDTHS][slot.group_span()], slot.group_len)
    state_lengths: dict[torch.dtype, int] = {}
    for key, dtype in packed_file.state_dtypes.items():
        state_lengths[dtype] = state_lengths.get(dtype, 0) + math.prod(packed_file.state_shapes[key])
    for dtype, length in state_lengths.items():
        _check_stream(path, tensors, state_stream(dtype), dtype, length)
    unexpected = set(tensors) - {CODES, WIDTHS, SCALES} - set(map(state_stream, state_lengths))
    if unexpected:
        raise PackedFileError(f"{path}: tensors {quoted_names(sorted(unexpected))} have no place in this architecture")
    return code_spans


def _code_spans(path: Path, tensors: dict, slots: list[LayerSlot]) -> list[slice]:
    """Where each layer's stream lies in ``codes``: its dense groups' widths and sparse groups' masks say."""
    codes = tensors.get(CODES)
    if codes is None:
        raise PackedFileError(f"{path}: tensor {CODES!r} is missing")
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise PackedFileError(f"{path}: tensor {CODES!r} must be a 1-D uint8 stream, got "
                              f"{dtype_name(codes.dtype)} {tuple(codes.shape)}")
    spans, offset = [], 0
    for slot in slots:
        length = 0
        if slot.groups:
            try:
                length = codec.stream_length(codes, offset, tensors[WIDTHS][slot.group_span()], slot.group_len)
            except codec.CodecError as exc:
                raise PackedFileError(f"{path}: tensor {CODES!r}, layer {quoted(slot.name)}: {exc}") from None
        spans.append(slice(offset, offset + length))
        offset += length
    return spans


def packed_layers(packed_file: PackedFile):
    """``(slot, packed stream, width bytes, scales)`` of each quantized layer, in layer order."""
    tensors = packed_file.tensors
    for slot, span in zip(packed_file.slots, packed_file.code_spans):
        yield slot, tensors[CODES][span], tensors[WIDTHS][slot.group_span()], tensors[SCALES][slot.group_span()]


def checked_codes(path: Path, slot: LayerSlot, packed, widths, scales, dtype: torch.dtype, device) -> torch.Tensor:
    """The int32 codes of one layer, ``(G, numel / G)`` in its ``grouped`` layout, decoded and checked.

    The one check of a layer's values: both runtimes and inspection call it, so they accept the same files.
    """
    if slot.groups == 0 or slot.numel == 0:
        return torch.zeros(slot.groups, 0, dtype=torch.int32, device=device)
    try:
        codes = codec.decode(packed.to(device), widths, 1, slot.group_len)
    except ValueError as exc:
        raise PackedFileError(f"{path}: layer {quoted(slot.name)}: {exc}") from exc
    validate.check_weight_range(path, slot.name, codes, scales, dtype)
    return codes


def check_layer_values(path: Path, packed_file: PackedFile) -> None:
    """Decode and check every stored layer, one at a time (:func:`checked_codes`), as loading does."""
    for (slot, packed, widths, scales), dtype in zip(packed_layers(packed_file), packed_file.weight_dtypes):
        checked_codes(path, slot, packed, widths, scales, dtype, torch.device("cpu"))


def _plain_entries(packed_file: PackedFile):
    """``(key, value)`` of each plain state-dict entry: a view of its stream, in the shape the model gives it."""
    offsets: dict[str, int] = {}
    for key, dtype in packed_file.state_dtypes.items():
        stream, shape = state_stream(dtype), packed_file.state_shapes[key]
        start = offsets.get(stream, 0)
        offsets[stream] = start + math.prod(shape)
        yield key, packed_file.tensors[stream][start:offsets[stream]].reshape(shape)
