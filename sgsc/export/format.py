"""The packed file's format: names, versions, header checks and where each layer sits in the streams.

docs/FORMAT.md specifies the bytes. Everything here is shared by the writer, the reader and inspection;
nothing here reads tensor values beyond the header and the checksums.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sgsc.nn import quantized_layers
from sgsc.ops.spec import MAX_WIDTH  # noqa: F401 - the widest group a file stores

FORMAT_NAME = "sgsc-packed"
FORMAT_VERSION = 3
# version 3 added sparse groups; a version 2 file is a version 3 file without them
READABLE_VERSIONS = (2, 3)
CODES, WIDTHS, SCALES = "codes", "widths", "scales"
STATE_PREFIX = "state."
HEADER_CRC_TENSOR = "header.crc32"


class PackedFileError(ValueError):
    """A file that is not a valid sgsc packed model (truncated, corrupt, wrong format or version)."""


# ---- layout -----------------------------------------------------------------------------------
#
# Since version 2 the file stores few, large streams rather than three tensors per layer and one per plain tensor:
# every shape, group count and tensor name follows from the rebuilt architecture, and in version 1
# the safetensors index and per-tensor CRCs spelling them out were ~3.3 KB of an ~18 KB file.


@dataclass(frozen=True)
class LayerSlot:
    """Where one quantized layer sits in the shared streams."""

    name: str
    shape: tuple[int, ...]
    groups: int
    first_group: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def group_len(self) -> int:
        return self.numel // self.groups if self.groups else 0

    def group_span(self) -> slice:
        return slice(self.first_group, self.first_group + self.groups)


def layer_slots(model: nn.Module) -> list[LayerSlot]:
    slots, first_group = [], 0
    for name, layer in quantized_layers(model):
        slots.append(LayerSlot(name, tuple(layer.weight.shape), layer.quant_groups, first_group))
        first_group += layer.quant_groups
    return slots


def quantized_state_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, _ in quantized_layers(model):
        prefix = f"{name}." if name else ""
        keys.update(f"{prefix}{p}" for p in ("weight", "bits", "exponent"))
    return keys


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries stored as they are, in state-dict order."""
    skip = quantized_state_keys(model)
    return {key: value for key, value in model.state_dict().items() if key not in skip}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_stream(dtype: torch.dtype) -> str:
    return f"{STATE_PREFIX}{dtype_name(dtype)}"


def crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy to bytes


def unreadable(path: Path, exc: Exception) -> PackedFileError:
    return PackedFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}")


def checked_header(path: Path, metadata: dict, stored_crc: torch.Tensor | None) -> dict:
    """The sgsc header of a file's safetensors ``metadata``, checked against its CRC tensor and the format."""
    if "sgsc" not in metadata:
        raise PackedFileError(f"{path} is a safetensors file but not an sgsc packed model (no 'sgsc' header)")
    if stored_crc is None or stored_crc.dtype != torch.int64 or stored_crc.shape != (1,):
        raise PackedFileError(f"{path}: the header checksum tensor {HEADER_CRC_TENSOR!r} is missing or malformed")
    if int(stored_crc) != zlib.crc32(metadata["sgsc"].encode()):
        raise PackedFileError(f"{path}: the sgsc header fails its CRC-32 check (corrupt header)")
    try:
        header = json.loads(metadata["sgsc"])
    except json.JSONDecodeError as exc:
        raise PackedFileError(f"{path}: the sgsc header is not valid JSON (corrupt header): {exc}") from exc
    check_header(path, header)
    return header


def stored_dtype(path: Path, header: dict, key: str, built: torch.dtype) -> torch.dtype:
    """The dtype state-dict entry ``key`` was exported with: the header's exception, else the built one."""
    name = header.get("dtypes", {}).get(key)
    return built if name is None else parse_dtype(path, name)


def parse_dtype(path: Path, name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PackedFileError(f"{path}: the header names {name!r}, which is not a torch dtype")
    return dtype


def check_header(path: Path, header: dict) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise PackedFileError(f"{path}: header format is {header.get('format') if isinstance(header, dict) else header!r}, expected {FORMAT_NAME!r}")
    if header.get("version") not in READABLE_VERSIONS or isinstance(header.get("version"), bool):
        raise PackedFileError(
            f"{path}: format version {header.get('version')!r} is not supported by this sgsc (reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key in ("model", "config", "crc32"):
        if key not in header:
            raise PackedFileError(f"{path}: header lacks {key!r}")
    for key in ("config", "crc32", "dtypes"):
        if not isinstance(header.get(key, {}), dict):
            raise PackedFileError(f"{path}: header {key!r} must be a JSON object, got {type(header[key]).__name__}")


def check_crcs(path: Path, crcs: dict, tensors: dict[str, torch.Tensor]) -> None:
    if set(crcs) != set(tensors):
        raise PackedFileError(
            f"{path}: the file's tensors do not match its header: missing {sorted(set(crcs) - set(tensors))}, "
            f"unlisted {sorted(set(tensors) - set(crcs))}"
        )
    for stream, tensor in tensors.items():
        if crc32(tensor) != crcs[stream]:
            raise PackedFileError(f"{path}: tensor {stream!r} fails its CRC-32 check (corrupt data)")
