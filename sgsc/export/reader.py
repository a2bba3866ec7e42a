"""Reading the packed file: every stream checked against the header and the architecture, then loaded."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from torch import nn

from sgsc.export import codec
from sgsc.export.architecture import rebuild_on_meta
from sgsc.export.format import (
    CODES,
    HEADER_CRC_TENSOR,
    SCALES,
    STATE_PREFIX,
    WIDTHS,
    LayerSlot,
    PackedFileError,
    check_crcs,
    checked_header,
    dtype_name,
    layer_slots,
    parse_dtype,
    plain_state,
    state_stream,
    stored_dtype,
    unreadable,
)
from sgsc.nn import QConv2d, QLinear, quantized_layers, replace_submodule


@dataclass
class PackedFile:
    """A packed file read and checked against its header and the architecture it names."""

    header: dict
    tensors: dict[str, torch.Tensor]
    architecture: nn.Module  # on the meta device: the loader fills it with the file's tensors
    slots: list[LayerSlot]
    state_dtypes: dict[str, torch.dtype]  # plain state-dict entry -> its stored dtype, in stream order
    state_shapes: dict[str, tuple[int, ...]]
    code_spans: list[slice] = dataclasses.field(default_factory=list)  # each layer's bytes of ``codes``, once checked


def read_packed(path: Path) -> PackedFile:
    if not path.is_file():
        raise FileNotFoundError(f"no packed model file at {path}")
    data = path.read_bytes()
    try:
        tensors = safetensors_load(data)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, ValueError, OSError) as exc:
        raise unreadable(path, exc) from exc
    header = checked_header(path, metadata, tensors.pop(HEADER_CRC_TENSOR, None))
    check_crcs(path, header["crc32"], tensors)
    try:
        rebuilt = rebuild_on_meta(header["model"], header["config"])
    except (ValueError, TypeError) as exc:
        raise PackedFileError(f"{path}: cannot rebuild model {header['model']!r} from the header's config: {exc}") from exc
    unknown = set(header.get("dtypes", {})) - set(rebuilt.state_dict())
    if unknown:
        raise PackedFileError(f"{path}: the header gives dtypes for {sorted(unknown)}, which the model lacks")
    plain = plain_state(rebuilt)
    state_dtypes = {key: stored_dtype(path, header, key, value.dtype) for key, value in plain.items()}
    packed_file = PackedFile(header, tensors, rebuilt, layer_slots(rebuilt), state_dtypes, {key: tuple(v.shape) for key, v in plain.items()})
    packed_file.code_spans = _check_streams(path, packed_file)
    return packed_file


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
    state_lengths: dict[str, int] = {}
    for key, dtype in packed_file.state_dtypes.items():
        stream = state_stream(dtype)
        state_lengths[stream] = state_lengths.get(stream, 0) + math.prod(packed_file.state_shapes[key])
    for stream, length in state_lengths.items():
        _check_stream(path, tensors, stream, parse_dtype(path, stream.removeprefix(STATE_PREFIX)), length)
    unexpected = set(tensors) - {CODES, WIDTHS, SCALES} - set(state_lengths)
    if unexpected:
        raise PackedFileError(f"{path}: tensors {sorted(unexpected)} have no place in this architecture")
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
                raise PackedFileError(f"{path}: tensor {CODES!r}, layer {slot.name!r}: {exc}") from None
        spans.append(slice(offset, offset + length))
        offset += length
    return spans


def packed_layers(packed_file: PackedFile):
    """``(slot, packed stream, width bytes, scales)`` of each quantized layer, in layer order."""
    tensors = packed_file.tensors
    for slot, span in zip(packed_file.slots, packed_file.code_spans):
        yield slot, tensors[CODES][span], tensors[WIDTHS][slot.group_span()], tensors[SCALES][slot.group_span()]


def _dequantized_weight(path: Path, slot: LayerSlot, packed, widths, scales, dtype: torch.dtype, device) -> torch.Tensor:
    """Group ``g``'s weights in row ``g`` of a ``(G, numel / G)`` tensor (the layer's ``grouped`` layout)."""
    if slot.groups == 0 or slot.numel == 0:
        return torch.zeros(slot.groups, 0, dtype=dtype, device=device)
    try:
        codes = codec.decode(packed.to(device), widths, 1, slot.group_len)
    except ValueError as exc:
        raise PackedFileError(f"{path}: layer {slot.name!r}: {exc}") from exc
    return (codes.to(torch.float32) * scales.to(device).unsqueeze(1)).to(dtype)


def _stored_plain_state(packed_file: PackedFile) -> dict[str, torch.Tensor]:
    offsets: dict[str, int] = {}
    state = {}
    for key, dtype in packed_file.state_dtypes.items():
        stream, shape = state_stream(dtype), packed_file.state_shapes[key]
        start = offsets.get(stream, 0)
        offsets[stream] = start + math.prod(shape)
        state[key] = packed_file.tensors[stream][start:offsets[stream]].reshape(shape).clone()
    return state


def float_layer(layer: QLinear | QConv2d, weight: torch.Tensor) -> nn.Module:
    """A plain nn layer with ``layer``'s hyper-parameters and bias, holding ``weight`` (frozen)."""
    if isinstance(layer, QConv2d):
        plain = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta",
        )
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return plain


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a runnable model from a packed file, in eval mode, on ``device``.

    Quantized layers come back as plain ``nn.Linear``/``nn.Conv2d`` holding the exact dequantized
    weights, so in eval mode the outputs equal those of the exported model bit for bit on the same
    device, and inference runs without the quantizer.
    """
    path = Path(path)
    device = torch.device(device)
    packed_file = read_packed(path)
    header = packed_file.header
    # the architecture from read_packed holds no storage: assigning the file's tensors is the only write
    model = packed_file.architecture
    model.load_state_dict(_stored_plain_state(packed_file), strict=False, assign=True)
    layers = dict(quantized_layers(model))
    for slot, packed, widths, scales in packed_layers(packed_file):
        layer = layers[slot.name]
        prefix = f"{slot.name}." if slot.name else ""
        dtype = stored_dtype(path, header, f"{prefix}weight", layer.weight.dtype)
        grouped = _dequantized_weight(path, slot, packed, widths, scales, dtype, device)
        replace_submodule(model, slot.name, float_layer(layer, layer.ungrouped(grouped)))
    left_on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left_on_meta:  # an architecture with state the file does not hold; never silently garbage
        raise PackedFileError(f"{path}: model {header['model']!r} has tensors the file does not hold: {left_on_meta}")
    return model.to(device).eval()


def read_header(path: str | os.PathLike) -> dict:
    """The checked sgsc header of a packed file, read without its weights.

    Only the header and its checksum are read and checked; :func:`load_packed` and :func:`summarize`
    check every tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no packed model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored_crc = handle.get_tensor(HEADER_CRC_TENSOR) if HEADER_CRC_TENSOR in handle.keys() else None
    except (SafetensorError, ValueError, OSError) as exc:
        raise unreadable(path, exc) from exc
    return checked_header(path, metadata, stored_crc)
