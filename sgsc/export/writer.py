"""Writing the packed file: each quantized layer's integer codes at their smallest widths, atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from sgsc._io import atomic_write
from sgsc.export import codec
from sgsc.export.architecture import check_matches_architecture, dtype_exceptions, rebuild_on_meta
from sgsc.export.format import (
    CODES,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_CRC_TENSOR,
    MAX_WIDTH,
    SCALES,
    WIDTHS,
    ZOO_VERSION,
    PackedFileError,
    check_data_record,
    crc32,
    plain_state,
    state_stream,
)
from sgsc.export.record import problems, record_of
from sgsc.nn import QConv2d, QLinear, quantized_layers
from sgsc.nn.zoo import model_name
from sgsc.ops import reference


def integer_codes(layer: QLinear | QConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers ``r`` of eq. (1) for every weight of ``layer`` and the per-group scales ``2^e``.

    :func:`sgsc.ops.reference.integer_codes` on the layer's ``grouped`` layout: the same float32
    arithmetic as the forward kernels (checked bit for bit against them in the tests), so ``r * scale``
    reproduces ``layer.quantized_weight()`` exactly. Returns int64 codes ``(G, L)``, row ``g`` holding
    group ``g`` (zeros for pruned groups), and float32 scales ``(G,)``.
    """
    try:
        return reference.integer_codes(layer.grouped(layer.weight.detach()), layer.bits.detach(),
                                       layer.exponent.detach(), layer.rounding)
    except ValueError as exc:
        raise ValueError(f"cannot export a layer whose {exc}") from None


def _pack_layer(name: str, layer: QLinear | QConv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scales = integer_codes(layer)
    widths = codec.minimal_widths(codes)
    too_wide = (widths > MAX_WIDTH).nonzero().flatten()
    if too_wide.numel():
        g = int(too_wide[0])
        raise ValueError(
            f"layer {name!r} group {g} needs {int(widths[g])} bits: at b >= 32 the float32 clamp bound "
            "2^31 - 1 rounds to 2^31; lower that group's bit depth before exporting"
        )
    packed, width_bytes = codec.encode(codes, widths)
    return packed, width_bytes, scales.cpu()


def _concat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([part.reshape(-1) for part in parts]) if parts else torch.empty(0, dtype=dtype)


def _streams(model: nn.Module, layer_names: list[str], plain: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``codes``, ``widths``, ``scales`` of the named quantized layers, and a ``state.<dtype>`` stream per dtype."""
    layers = dict(quantized_layers(model))
    packed, widths, scales = [], [], []
    for layer_name in layer_names:
        for parts, part in zip((packed, widths, scales), _pack_layer(layer_name, layers[layer_name])):
            parts.append(part)
    tensors = {CODES: _concat(packed, torch.uint8), WIDTHS: _concat(widths, torch.uint8), SCALES: _concat(scales, torch.float32)}
    state: dict[str, list[torch.Tensor]] = {}
    for value in plain.values():
        state.setdefault(state_stream(value.dtype), []).append(value.detach().cpu())
    tensors.update({stream: _concat(parts, parts[0].dtype) for stream, parts in state.items()})
    return tensors


def build_packed_state(model: nn.Module, data: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON header of ``model``'s packed file, all on the CPU.

    A zoo model's file names it and its config (version 3); any other model's file holds its
    architecture record (version 4, :mod:`sgsc.export.record`). ``data`` (optional) records what
    the model was trained on, ``{"name": "digits", "seed": 0}``, so `sgsc eval` can score it on the
    same split. A ``"dir"`` key is dropped: a file names no paths, as a file that chose which paths
    its reader opens would be a hazard.
    """
    try:
        name = model_name(model)
    except TypeError:  # not a zoo model: its file records the architecture itself
        name = None
    if name is not None:
        config = dataclasses.asdict(model.config)
        rebuilt = rebuild_on_meta(name, config)
        check_matches_architecture(model, rebuilt)
        tensors = _streams(model, [layer_name for layer_name, _ in quantized_layers(model)], plain_state(model))
        header = {"format": FORMAT_NAME, "version": ZOO_VERSION, "model": name, "config": config,
                  "crc32": {stream: crc32(tensor) for stream, tensor in tensors.items()}}
        dtypes = dtype_exceptions(model, rebuilt)
        if dtypes:
            header["dtypes"] = dtypes
    else:
        record = record_of(model)
        problem = problems(record)
        if problem is not None:
            raise ValueError(f"cannot export this model: {problem}")
        state = model.state_dict()
        tensors = _streams(model, [layer.name for layer in record.stored_layers()], {key: state[key] for key in record.plain()})
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "architecture": record.to_json(),
                  "crc32": {stream: crc32(tensor) for stream, tensor in tensors.items()}}
    if data is not None:
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict such as {{'name': 'digits', 'seed': 0}}, got {type(data).__name__}")
        header["data"] = {key: value for key, value in data.items() if key != "dir"}
        check_data_record(header["data"])
    return tensors, header


def _serialize(model: nn.Module, data: dict | None) -> bytes:
    """The file's bytes."""
    tensors, header = build_packed_state(model, data)
    header_json = json.dumps(header, sort_keys=True, separators=(",", ":"))
    # The CRC rides in a tensor, not a second metadata key: safetensors writes metadata keys in hash
    # order, and with a single key the same model always gives the same bytes.
    tensors[HEADER_CRC_TENSOR] = torch.tensor([zlib.crc32(header_json.encode())], dtype=torch.int64)
    return safetensors_save(tensors, metadata={"sgsc": header_json})


def save_packed(model: nn.Module, path: str | os.PathLike, *, data: dict | None = None):
    """Write ``model`` as a packed file at ``path``, atomically: any architecture, no registry.

    A zoo model's file names it and its config; any other model's file records its quantized layers,
    the shape and dtype of every state-dict entry (so a physically pruned model is described
    exactly) and its tied tensors, and loads with ``load_packed(path, model=<its float architecture>)``.
    ``data`` optionally records the training data (see :func:`build_packed_state`). Returns the
    :class:`~sgsc.export.inspect.PackedSummary` of what was written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    from sgsc.export.inspect import summarize_bytes  # inspection reads files; writing does not need it otherwise

    payload = _serialize(model, data)
    try:
        # the reader's checks, on the bytes about to be written: never a file that sgsc cannot load. No
        # memory bound: the model is in memory already, and a caller loads it with a max_bytes to match.
        summary = summarize_bytes(Path(path), payload, max_bytes=sys.maxsize)
    except PackedFileError as exc:
        raise ValueError(f"cannot export this model: {exc}") from None
    atomic_write(path, payload)
    return summary


