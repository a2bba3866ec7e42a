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


def state_key(module: str, part: str) -> str:
    """The state-dict key of ``module``'s entry ``part`` (the model itself is module ``""``)."""
    return f"{module}.{part}" if module else part


def quantized_state_keys(model: nn.Module) -> set[str]:
    return {state_key(name, part) for name, _ in quantized_layers(model) for part in ("weight", "bits", "exponent")}


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


# Strings a file gives (layer and entry names, keys) reach messages and the terminal: each is shown as
# repr escapes it, so no byte of a file acts as a control sequence, and cut, so no name makes a long line.
MAX_SHOWN_NAME = 80


def quoted(value: object) -> str:
    """``value`` (a name or other JSON value a file gave) as a message shows it: its repr, which escapes every
    character that does not print, cut to ``MAX_SHOWN_NAME`` characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_NAME else f"{text[:MAX_SHOWN_NAME]}... ({len(text):,} characters)"


def quoted_names(names, most: int = 8) -> str:
    """A list of names for a message: the first ``most``, each :func:`quoted`, and how many more there are."""
    names = list(names)
    more = f", and {len(names) - most:,} more" if len(names) > most else ""
    return f"[{', '.join(map(quoted, names[:most]))}{more}]"


def printable(name: str, width: int = MAX_SHOWN_NAME) -> str:
    """``name`` for a table: as it is where every character prints, else escaped as repr escapes it; at most ``width``
    characters."""
    text = name if name.isprintable() else repr(name)[1:-1]
    return text if len(text) <= width else f"{text[:width - 3]}..."


def unreadable(path: Path, exc: Exception) -> PackedFileError:
    return PackedFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}")


# ---- what a file may contain -------------------------------------------------------------------

# Every dtype a stream may have, by its safetensors code: the fixed streams' uint8, float32 and int64,
# the float dtypes a model may be cast to, and the dtypes of buffers a user registers (a bool causal
# mask, integer tables). Anything else (complex, float8, unsigned wider than a byte, quantized) has no
# torch kernels for most ops, and would fail only at a model's first forward.
STORED_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                 "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}
# safetensors' own bound on its header (its MAX_HEADER_SIZE): refused before a byte of it is read
MAX_INDEX_BYTES = 100_000_000
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


def index_length(path: Path, head: bytes, file_bytes: int) -> int:
    """The length of the safetensors header that follows a file's first 8 bytes ``head``, checked against the
    file's ``file_bytes`` and safetensors' own bound before any of it is read."""
    if file_bytes < 8 or len(head) < 8:
        raise unreadable(path, ValueError(f"{file_bytes} bytes, shorter than the 8-byte header length"))
    length = int.from_bytes(head[:8], "little")
    if length > file_bytes - 8:
        raise unreadable(path, ValueError(f"the header claims {length} bytes, the file has {file_bytes - 8} after it"))
    if length > MAX_INDEX_BYTES:
        raise unreadable(path, ValueError(f"the header claims {length:,} bytes, more than safetensors reads "
                                          f"({MAX_INDEX_BYTES:,})"))
    return length


def parse_index(path: Path, data: bytes, file_bytes: int) -> dict:
    """The safetensors header at the start ``data`` of a file of ``file_bytes``, strictly parsed and checked.

    safetensors itself keeps the last of duplicate tensor names, so they are refused here first; and
    where each tensor's bytes lie is checked against the file's size, so a file is refused before its data
    is read.
    """
    length = index_length(path, data, file_bytes)
    if len(data) < 8 + length:
        raise unreadable(path, ValueError(f"the header claims {length} bytes, the file has {len(data) - 8} after it"))
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
            raise PackedFileError(f"{path}: tensor {quoted(name)} is not a tensor of a stored dtype "
                                  f"({', '.join(STORED_DTYPES)}): {quoted(entry)}")
    _check_offsets(path, index, file_bytes - 8 - length)
    return index


def _check_offsets(path: Path, index: dict, data_bytes: int) -> None:
    """The tensors lie back to back, each as long as its dtype and shape say, and cover the ``data_bytes``
    after the header exactly: safetensors' own rule, checked (in Python ints) before the data is read."""
    end = 0
    entries = sorted((entry["data_offsets"], name, entry) for name, entry in index.items() if name != "__metadata__")
    for (begin, stop), name, entry in entries:
        size = math.prod(entry["shape"]) * STORED_DTYPES[entry["dtype"]].itemsize
        if begin != end or stop - begin != size:
            raise unreadable(path, ValueError(f"tensor {quoted(name)} lies at bytes {begin}..{stop} of the data, where "
                                              f"its {size:,} bytes would lie at {end}..{end + size}"))
        end = stop
    if end != data_bytes:
        raise unreadable(path, ValueError(f"the tensors take {end:,} bytes, the file has {data_bytes:,} after the "
                                          "header"))


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
        raise PackedFileError(f"{path}: the header names {quoted(name)}, which is not a torch dtype a file may store "
                              f"({', '.join(map(dtype_name, FLOAT_DTYPES))})")
    return dtype


def _fail(path: Path, what: str) -> PackedFileError:
    return PackedFileError(f"{path}: {what}")


def check_header(path: Path, header: object) -> None:
    """Every field of the sgsc header as docs/FORMAT.md gives it; the tensors are checked later."""
    if not isinstance(header, dict):
        raise _fail(path, f"the sgsc header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT_NAME:
        raise _fail(path, f"header format is {quoted(header.get('format'))}, expected {FORMAT_NAME!r}")
    version = header.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise _fail(path, f"format version {quoted(version)} is not supported by this sgsc (reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    required, optional = (RECORD_REQUIRED_KEYS, RECORD_OPTIONAL_KEYS) if version == 4 else (REQUIRED_KEYS, OPTIONAL_KEYS)
    missing = [key for key in required if key not in header]
    if missing:
        raise _fail(path, f"header lacks {missing}")
    unknown = sorted(set(header) - set(required) - set(optional))
    if unknown:
        raise _fail(path, f"header has unknown keys {quoted_names(unknown)} (a version {version} header holds "
                          f"{', '.join(required + optional)})")
    if not isinstance(header.get("model", ""), str):
        raise _fail(path, f"header 'model' must be a string, got {type(header['model']).__name__}")
    for key in ("config", "architecture", "crc32", "dtypes", "data"):
        if not isinstance(header.get(key, {}), dict):
            raise _fail(path, f"header {key!r} must be a JSON object, got {type(header[key]).__name__}")
    bad_crcs = sorted(name for name, crc in header["crc32"].items() if type(crc) is not int or not 0 <= crc < 2**32)
    if bad_crcs:
        raise _fail(path, f"header 'crc32' values must be integers 0..2^32-1; {quoted_names(bad_crcs)} are not")
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
        raise ValueError(f"unknown keys {quoted_names(unknown)} (a data record holds {', '.join(DATA_KEYS[:2])})")
    name = record.get("name")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= MAX_DATA_NAME and name.isprintable()):
        raise ValueError(f"'name' must be a short data set name, got {quoted(name)}")
    seed = record.get("seed")
    if seed is not None and (type(seed) is not int or seed not in SEED_RANGE):
        raise ValueError(f"'seed' must be an integer 0..2^32-1, got {quoted(seed)}")
    if not isinstance(record.get("dir"), (str, type(None))):
        raise ValueError(f"'dir' must be a string if present, got {type(record['dir']).__name__}")


def check_crcs(path: Path, crcs: dict, tensors: dict[str, torch.Tensor]) -> None:
    if set(crcs) != set(tensors):
        missing, unlisted = sorted(set(crcs) - set(tensors)), sorted(set(tensors) - set(crcs))
        raise PackedFileError(f"{path}: the file's tensors do not match its header: missing {quoted_names(missing)}, "
                              f"unlisted {quoted_names(unlisted)}")
    for stream, tensor in tensors.items():
        if crc32(tensor) != crcs[stream]:
            raise PackedFileError(f"{path}: tensor {quoted(stream)} fails its CRC-32 check (corrupt data)")
