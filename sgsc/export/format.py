"""The packed file's format: names, versions, header checks and where each layer sits in the streams.

docs/FORMAT.md specifies the bytes. Everything here is shared by the writer, the reader and inspection;
nothing here reads tensor values beyond the header and the checksums.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sgsc.export import strict_json
from sgsc.nn import quantized_layers
from sgsc.ops.spec import MAX_WIDTH  # noqa: F401 - the widest group a file stores

FORMAT_NAME = "sgsc-packed"
FORMAT_VERSION = 4
# version 3 added sparse groups; a version 2 file is a version 3 file without them. Version 4 added the
# architecture record, which describes any model; a zoo model's file uses nothing version 4 added and is
# still written as version 3 (older readers read it, and its bytes did not change).
READABLE_VERSIONS = (2, 3, 4)
ZOO_VERSION = 3
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
    return PackedFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}")


# ---- what a file may contain -------------------------------------------------------------------

# Every dtype a stream may have, by its safetensors code: the fixed streams' uint8, float32 and int64,
# and the float dtypes a model may be cast to. Anything else (complex, bool, float8, quantized) no
# writer emits, and most of it fails only at a model's first forward.
STORED_DTYPES = ("U8", "I64", "F16", "BF16", "F32", "F64")
# The dtypes a floating state-dict entry may be stored in (the header's ``dtypes``); other entries
# keep the dtype the architecture builds.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REQUIRED_KEYS = ("format", "version", "model", "config", "crc32")
OPTIONAL_KEYS = ("dtypes", "data")
# version 4: the architecture record replaces the registry name and config, and gives every dtype itself
RECORD_REQUIRED_KEYS = ("format", "version", "architecture", "crc32")
RECORD_OPTIONAL_KEYS = ("data",)
DATA_KEYS = ("name", "seed", "dir")  # "dir" only in files written before it was dropped; ignored
MAX_DATA_NAME = 64
SEED_RANGE = range(2**32)


def parse_index(path: Path, data: bytes, file_bytes: int) -> dict:
    """The safetensors header at the start ``data`` of a file of ``file_bytes``, strictly parsed and checked.

    safetensors itself keeps the last of duplicate tensor names, so they are refused here first.
    """
    if file_bytes < 8:
        raise unreadable(path, ValueError(f"{file_bytes} bytes, shorter than the 8-byte header length"))
    length = int.from_bytes(data[:8], "little")
    if length > file_bytes - 8 or len(data) < 8 + length:
        raise unreadable(path, ValueError(f"the header claims {length} bytes, the file has {file_bytes - 8} after it"))
    try:
        index = strict_json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise unreadable(path, exc) from None
    if not isinstance(index, dict):
        raise unreadable(path, ValueError("the header is not a JSON object"))
    for name, entry in index.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise unreadable(path, ValueError("__metadata__ must map names to strings"))
        elif (not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}
              or entry["dtype"] not in STORED_DTYPES or not _naturals(entry["shape"])
              or not _naturals(entry["data_offsets"]) or len(entry["data_offsets"]) != 2):
            raise PackedFileError(f"{path}: tensor {name!r} is not a tensor of a stored dtype "
                                  f"({', '.join(STORED_DTYPES)}): {str(entry)[:120]}")
    return index


def _naturals(value) -> bool:
    return isinstance(value, list) and all(type(item) is int and item >= 0 for item in value)


def checked_header(path: Path, metadata: dict, stored_crc: torch.Tensor | None) -> dict:
    """The sgsc header of a file's safetensors ``metadata``, checked against its CRC tensor and the format."""
    if "sgsc" not in metadata:
        raise PackedFileError(f"{path}: a safetensors file but not an sgsc packed model (no 'sgsc' header)")
    if stored_crc is None or stored_crc.dtype != torch.int64 or stored_crc.shape != (1,):
        raise PackedFileError(f"{path}: the header checksum tensor {HEADER_CRC_TENSOR!r} is missing or malformed")
    if int(stored_crc) != zlib.crc32(metadata["sgsc"].encode()):
        raise PackedFileError(f"{path}: the sgsc header fails its CRC-32 check (corrupt header)")
    try:
        header = strict_json.loads(metadata["sgsc"])
    except ValueError as exc:
        raise PackedFileError(f"{path}: the sgsc header is not strict JSON: {exc}") from None
    check_header(path, header)
    return header


def stored_dtype(path: Path, header: dict, key: str, built: torch.dtype) -> torch.dtype:
    """The dtype state-dict entry ``key`` was exported with: the header's exception, else the built one."""
    name = header.get("dtypes", {}).get(key)
    if name is None:
        return built
    dtype = parse_dtype(path, name)
    if not built.is_floating_point:
        raise PackedFileError(f"{path}: the header stores {key!r} as {name}, but it is {dtype_name(built)}, "
                              "which a file keeps as built")
    return dtype


def parse_dtype(path: Path, name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in FLOAT_DTYPES:
        raise PackedFileError(f"{path}: the header names {name!r}, which is not a torch dtype a file may store "
                              f"({', '.join(map(dtype_name, FLOAT_DTYPES))})")
    return dtype


def _fail(path: Path, what: str) -> PackedFileError:
    return PackedFileError(f"{path}: {what}")


def check_header(path: Path, header: object) -> None:
    """Every field of the sgsc header as docs/FORMAT.md gives it; the tensors are checked later."""
    if not isinstance(header, dict):
        raise _fail(path, f"the sgsc header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT_NAME:
        raise _fail(path, f"header format is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    version = header.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise _fail(path, f"format version {version!r} is not supported by this sgsc (reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    required, optional = (RECORD_REQUIRED_KEYS, RECORD_OPTIONAL_KEYS) if version == 4 else (REQUIRED_KEYS, OPTIONAL_KEYS)
    missing = [key for key in required if key not in header]
    if missing:
        raise _fail(path, f"header lacks {missing}")
    unknown = sorted(set(header) - set(required) - set(optional))
    if unknown:
        raise _fail(path, f"header has unknown keys {unknown} (a version {version} header holds "
                          f"{', '.join(required + optional)})")
    if not isinstance(header.get("model", ""), str):
        raise _fail(path, f"header 'model' must be a string, got {type(header['model']).__name__}")
    for key in ("config", "architecture", "crc32", "dtypes", "data"):
        if not isinstance(header.get(key, {}), dict):
            raise _fail(path, f"header {key!r} must be a JSON object, got {type(header[key]).__name__}")
    bad_crcs = sorted(name for name, crc in header["crc32"].items() if type(crc) is not int or not 0 <= crc < 2**32)
    if bad_crcs:
        raise _fail(path, f"header 'crc32' values must be integers 0..2^32-1; {bad_crcs} are not")
    for name in header.get("dtypes", {}).values():
        parse_dtype(path, name)
    try:
        check_data_record(header.get("data", {}))
    except ValueError as exc:
        raise _fail(path, f"header 'data': {exc}") from None


def check_data_record(record: dict) -> None:
    """A data record names a data set and a split seed, nothing else: a file never chooses paths to open."""
    unknown = sorted(set(record) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} (a data record holds {', '.join(DATA_KEYS[:2])})")
    name = record.get("name")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= MAX_DATA_NAME and name.isprintable()):
        raise ValueError(f"'name' must be a short data set name, got {str(name)[:80]!r}")
    seed = record.get("seed")
    if seed is not None and (type(seed) is not int or seed not in SEED_RANGE):
        raise ValueError(f"'seed' must be an integer 0..2^32-1, got {str(seed)[:80]}")
    if not isinstance(record.get("dir"), (str, type(None))):
        raise ValueError(f"'dir' must be a string if present, got {type(record['dir']).__name__}")


def check_crcs(path: Path, crcs: dict, tensors: dict[str, torch.Tensor]) -> None:
    if set(crcs) != set(tensors):
        raise PackedFileError(
            f"{path}: the file's tensors do not match its header: missing {sorted(set(crcs) - set(tensors))}, "
            f"unlisted {sorted(set(tensors) - set(crcs))}"
        )
    for stream, tensor in tensors.items():
        if crc32(tensor) != crcs[stream]:
            raise PackedFileError(f"{path}: tensor {stream!r} fails its CRC-32 check (corrupt data)")
