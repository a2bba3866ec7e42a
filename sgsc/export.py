"""The packed model file: export a trained sgsc model, inspect it, load it back as a runnable model.

The file is a safetensors file (no pickle: loading can never run code). It holds the integer codes
of every quantized layer's groups packed at each group's *smallest* width, each group dense or, when
that is smaller, as a bitmask and its nonzero codes (:mod:`sgsc.codec`), the width bytes and the
per-group scales ``2^e``, each concatenated over the layers into one stream; every
other tensor of the state dict (biases, norms, embeddings, batch-norm statistics) is stored as it
is, concatenated into one stream per dtype. A JSON header in the safetensors metadata names the
format and version, the model's registry name and config (which fix every shape, so the streams
need no index of their own) and each stream's CRC-32. docs/FORMAT.md specifies all of it.

The layout is device-independent: loading unpacks on whatever device the model goes to.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.overrides import TorchFunctionMode

from sgsc import codec
from sgsc._io import atomic_write
from sgsc.layers import QConv2d, QLinear, quantized_layers, replace_submodule
from sgsc.models import build_model, model_name
from sgsc.reference import group_params

FORMAT_NAME = "sgsc-packed"
FORMAT_VERSION = 3
# version 3 added sparse groups; a version 2 file is a version 3 file without them
READABLE_VERSIONS = (2, 3)
MAX_WIDTH = codec.MAX_WIDTH
CODES, WIDTHS, SCALES = "codes", "widths", "scales"
_STATE_PREFIX = "state."
HEADER_CRC_TENSOR = "header.crc32"


class PackedFileError(ValueError):
    """A file that is not a valid sgsc packed model (truncated, corrupt, wrong format or version)."""


# ---- integer codes and widths ----------------------------------------------------------------


@torch.no_grad()
def integer_codes(layer: QLinear | QConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers ``r`` of eq. (1) for every weight of ``layer`` and the per-group scales ``2^e``.

    Computed with the same float32 arithmetic as the forward kernels (checked bit for bit against
    them in the tests), so ``r * scale`` reproduces ``layer.quantized_weight()`` exactly.
    Returns int64 codes of shape ``(G, L)``, row ``g`` holding group ``g`` in the layer's ``grouped`` layout
    (zeros for pruned groups), and float32 scales ``(G,)``.
    """
    bits, exponent = layer.bits.detach().float(), layer.exponent.detach().float()
    scale, inv_scale, lo, hi, kept_bits = group_params(bits, exponent)
    scaled = layer.grouped(layer.weight.detach().float()) * scale.unsqueeze(1)
    clamped = torch.clamp(scaled, lo.unsqueeze(1), hi.unsqueeze(1))
    rounded = torch.floor(clamped) if layer.rounding == "floor" else torch.round(clamped)
    if not torch.isfinite(rounded).all():
        raise ValueError("cannot export a layer whose weights or quantizer parameters are not finite")
    rounded = torch.where(kept_bits.unsqueeze(1) > 0, rounded, torch.zeros_like(rounded))
    return rounded.to(torch.int64), inv_scale


def minimal_widths(codes: torch.Tensor) -> torch.Tensor:
    """Smallest two's-complement width per row of ``codes`` that holds all of its values (0 for all-zero rows)."""
    if codes.numel() == 0:
        return torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
    high = codes.amax(dim=1).clamp_min(0)
    low = (-codes.amin(dim=1) - 1).clamp_min(0)  # -2^(w-1) <= min  <=>  bit_length(-min - 1) <= w - 1
    magnitude = torch.maximum(high, low)
    thresholds = 2 ** torch.arange(63, device=codes.device, dtype=torch.int64)
    bit_length = (magnitude.unsqueeze(1) >= thresholds).sum(dim=1)
    nonzero = (codes != 0).any(dim=1)
    return torch.where(nonzero, bit_length + 1, torch.zeros_like(bit_length))


# ---- layout -----------------------------------------------------------------------------------
#
# Since version 2 the file stores few, large streams rather than three tensors per layer and one per plain tensor:
# every shape, group count and tensor name follows from the rebuilt architecture, and in version 1
# the safetensors index and per-tensor CRCs spelling them out were ~3.3 KB of an ~18 KB file.


@dataclass(frozen=True)
class _LayerSlot:
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


def _layer_slots(model: nn.Module) -> list[_LayerSlot]:
    slots, first_group = [], 0
    for name, layer in quantized_layers(model):
        slots.append(_LayerSlot(name, tuple(layer.weight.shape), layer.quant_groups, first_group))
        first_group += layer.quant_groups
    return slots


def _quantized_state_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, _ in quantized_layers(model):
        prefix = f"{name}." if name else ""
        keys.update(f"{prefix}{p}" for p in ("weight", "bits", "exponent"))
    return keys


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries stored as they are, in state-dict order."""
    skip = _quantized_state_keys(model)
    return {key: value for key, value in model.state_dict().items() if key not in skip}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _state_stream(dtype: torch.dtype) -> str:
    return f"{_STATE_PREFIX}{_dtype_name(dtype)}"


class _SkipInitOnMeta(TorchFunctionMode):
    """Initialisation of a meta tensor, which has no values to set, returns it untouched.

    On meta, ``normal_`` runs a Python decomposition whose first use imports ``torch._dynamo``:
    seconds of a loading process's start-up spent on values that do not exist. Every
    ``torch.nn.init`` function fills its first argument in place and returns it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def _architecture(name: str, config: dict) -> nn.Module:
    """The model ``name`` rebuilt from ``config`` on the meta device: shapes and dtypes only."""
    with torch.device("meta"), _SkipInitOnMeta():
        return build_model(name, config)


def _check_matches_architecture(model: nn.Module, rebuilt: nn.Module) -> None:
    """The file describes ``model`` only through its config, so the config must rebuild it exactly."""
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: tuple(value.shape) for key, value in rebuilt.state_dict().items()}
    if ours != theirs or _layer_slots(model) != _layer_slots(rebuilt):
        differing = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
        raise ValueError(
            "model does not match the architecture its config rebuilds (changed layers, shapes or quantization "
            f"groups); differing state-dict entries: {differing or 'none, but the quantized layers or groups differ'}"
        )


def _dtype_exceptions(model: nn.Module, rebuilt: nn.Module) -> dict[str, str]:
    """State-dict entries whose dtype is not the one the rebuilt architecture has (usually none)."""
    theirs = rebuilt.state_dict()
    return {key: _dtype_name(value.dtype) for key, value in model.state_dict().items() if value.dtype != theirs[key].dtype}


# ---- export -----------------------------------------------------------------------------------


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy to bytes


def _pack_layer(name: str, layer: QLinear | QConv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scales = integer_codes(layer)
    widths = minimal_widths(codes)
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


def build_packed_state(model: nn.Module, data: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON header of ``model``'s packed file, all on the CPU.

    ``data`` (optional, JSON-able) records what the model was trained on, e.g.
    ``{"name": "digits", "dir": None, "seed": 0}``, so `sgsc eval` can score it on the same split.
    """
    name, config = model_name(model), dataclasses.asdict(model.config)
    rebuilt = _architecture(name, config)
    _check_matches_architecture(model, rebuilt)
    packed, widths, scales = [], [], []
    for layer_name, layer in quantized_layers(model):
        for parts, part in zip((packed, widths, scales), _pack_layer(layer_name, layer)):
            parts.append(part)
    tensors = {CODES: _concat(packed, torch.uint8), WIDTHS: _concat(widths, torch.uint8), SCALES: _concat(scales, torch.float32)}
    state: dict[str, list[torch.Tensor]] = {}
    for value in _plain_state(model).values():
        state.setdefault(_state_stream(value.dtype), []).append(value.detach().cpu())
    tensors.update({stream: _concat(parts, parts[0].dtype) for stream, parts in state.items()})
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": name,
        "config": config,
        "crc32": {stream: _crc32(tensor) for stream, tensor in tensors.items()},
    }
    dtypes = _dtype_exceptions(model, rebuilt)
    if dtypes:
        header["dtypes"] = dtypes
    if data is not None:
        header["data"] = data
    return tensors, header


def export_packed(model: nn.Module, path: str | os.PathLike, *, data: dict | None = None) -> "PackedSummary":
    """Write ``model`` (an sgsc zoo model) as a packed file at ``path``, atomically.

    ``data`` optionally records the training data (see :func:`build_packed_state`). Returns the
    size accounting of what was written.
    """
    tensors, header = build_packed_state(model, data)
    header_json = json.dumps(header, sort_keys=True, separators=(",", ":"))
    # The CRC rides in a tensor, not a second metadata key: safetensors writes metadata keys in hash
    # order, and with a single key the same model always gives the same bytes.
    tensors[HEADER_CRC_TENSOR] = torch.tensor([zlib.crc32(header_json.encode())], dtype=torch.int64)
    payload = safetensors_save(tensors, metadata={"sgsc": header_json})
    atomic_write(path, payload)
    return summarize(Path(path))


# ---- reading and validating -----------------------------------------------------------------


@dataclass
class _PackedFile:
    """A packed file read and checked against its header and the architecture it names."""

    header: dict
    tensors: dict[str, torch.Tensor]
    architecture: nn.Module  # on the meta device: the loader fills it with the file's tensors
    slots: list[_LayerSlot]
    state_dtypes: dict[str, torch.dtype]  # plain state-dict entry -> its stored dtype, in stream order
    state_shapes: dict[str, tuple[int, ...]]
    code_spans: list[slice] = dataclasses.field(default_factory=list)  # each layer's bytes of ``codes``, once checked


def _read(path: Path) -> _PackedFile:
    if not path.is_file():
        raise FileNotFoundError(f"no packed model file at {path}")
    data = path.read_bytes()
    try:
        tensors = safetensors_load(data)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, ValueError, OSError) as exc:
        raise _unreadable(path, exc) from exc
    header = _checked_header(path, metadata, tensors.pop(HEADER_CRC_TENSOR, None))
    _check_crcs(path, header["crc32"], tensors)
    try:
        rebuilt = _architecture(header["model"], header["config"])
    except (ValueError, TypeError) as exc:
        raise PackedFileError(f"{path}: cannot rebuild model {header['model']!r} from the header's config: {exc}") from exc
    unknown = set(header.get("dtypes", {})) - set(rebuilt.state_dict())
    if unknown:
        raise PackedFileError(f"{path}: the header gives dtypes for {sorted(unknown)}, which the model lacks")
    plain = _plain_state(rebuilt)
    state_dtypes = {key: _stored_dtype(path, header, key, value.dtype) for key, value in plain.items()}
    packed_file = _PackedFile(header, tensors, rebuilt, _layer_slots(rebuilt), state_dtypes, {key: tuple(v.shape) for key, v in plain.items()})
    packed_file.code_spans = _check_streams(path, packed_file)
    return packed_file


def _unreadable(path: Path, exc: Exception) -> PackedFileError:
    return PackedFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}")


def _checked_header(path: Path, metadata: dict, stored_crc: torch.Tensor | None) -> dict:
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
    _check_header(path, header)
    return header


def _stored_dtype(path: Path, header: dict, key: str, built: torch.dtype) -> torch.dtype:
    """The dtype state-dict entry ``key`` was exported with: the header's exception, else the built one."""
    name = header.get("dtypes", {}).get(key)
    return built if name is None else _parse_dtype(path, name)


def _parse_dtype(path: Path, name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PackedFileError(f"{path}: the header names {name!r}, which is not a torch dtype")
    return dtype


def _check_header(path: Path, header: dict) -> None:
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


def _check_crcs(path: Path, crcs: dict, tensors: dict[str, torch.Tensor]) -> None:
    if set(crcs) != set(tensors):
        raise PackedFileError(
            f"{path}: the file's tensors do not match its header: missing {sorted(set(crcs) - set(tensors))}, "
            f"unlisted {sorted(set(tensors) - set(crcs))}"
        )
    for stream, tensor in tensors.items():
        if _crc32(tensor) != crcs[stream]:
            raise PackedFileError(f"{path}: tensor {stream!r} fails its CRC-32 check (corrupt data)")


def _check_stream(path: Path, tensors: dict, stream: str, dtype: torch.dtype, length: int) -> None:
    tensor = tensors.get(stream)
    if tensor is None:
        raise PackedFileError(f"{path}: tensor {stream!r} is missing")
    if tensor.dtype != dtype or tensor.shape != (length,):
        raise PackedFileError(
            f"{path}: tensor {stream!r} must be {_dtype_name(dtype)} of shape ({length},) for this architecture, "
            f"got {_dtype_name(tensor.dtype)} {tuple(tensor.shape)}"
        )


def _check_streams(path: Path, packed_file: _PackedFile) -> list[slice]:
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
        stream = _state_stream(dtype)
        state_lengths[stream] = state_lengths.get(stream, 0) + math.prod(packed_file.state_shapes[key])
    for stream, length in state_lengths.items():
        _check_stream(path, tensors, stream, _parse_dtype(path, stream.removeprefix(_STATE_PREFIX)), length)
    unexpected = set(tensors) - {CODES, WIDTHS, SCALES} - set(state_lengths)
    if unexpected:
        raise PackedFileError(f"{path}: tensors {sorted(unexpected)} have no place in this architecture")
    return code_spans


def _code_spans(path: Path, tensors: dict, slots: list[_LayerSlot]) -> list[slice]:
    """Where each layer's stream lies in ``codes``: its dense groups' widths and sparse groups' masks say."""
    codes = tensors.get(CODES)
    if codes is None:
        raise PackedFileError(f"{path}: tensor {CODES!r} is missing")
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise PackedFileError(f"{path}: tensor {CODES!r} must be a 1-D uint8 stream, got "
                              f"{_dtype_name(codes.dtype)} {tuple(codes.shape)}")
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


def _packed_layers(packed_file: _PackedFile):
    """``(slot, packed stream, width bytes, scales)`` of each quantized layer, in layer order."""
    tensors = packed_file.tensors
    for slot, span in zip(packed_file.slots, packed_file.code_spans):
        yield slot, tensors[CODES][span], tensors[WIDTHS][slot.group_span()], tensors[SCALES][slot.group_span()]


def _dequantized_weight(path: Path, slot: _LayerSlot, packed, widths, scales, dtype: torch.dtype, device) -> torch.Tensor:
    """Group ``g``'s weights in row ``g`` of a ``(G, numel / G)`` tensor (the layer's ``grouped`` layout)."""
    if slot.groups == 0 or slot.numel == 0:
        return torch.zeros(slot.groups, 0, dtype=dtype, device=device)
    try:
        codes = codec.decode(packed.to(device), widths, 1, slot.group_len)
    except ValueError as exc:
        raise PackedFileError(f"{path}: layer {slot.name!r}: {exc}") from exc
    return (codes.to(torch.float32) * scales.to(device).unsqueeze(1)).to(dtype)


def _stored_plain_state(packed_file: _PackedFile) -> dict[str, torch.Tensor]:
    offsets: dict[str, int] = {}
    state = {}
    for key, dtype in packed_file.state_dtypes.items():
        stream, shape = _state_stream(dtype), packed_file.state_shapes[key]
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
    packed_file = _read(path)
    header = packed_file.header
    # the architecture from _read holds no storage: assigning the file's tensors is the only write
    model = packed_file.architecture
    model.load_state_dict(_stored_plain_state(packed_file), strict=False, assign=True)
    layers = dict(quantized_layers(model))
    for slot, packed, widths, scales in _packed_layers(packed_file):
        layer = layers[slot.name]
        prefix = f"{slot.name}." if slot.name else ""
        dtype = _stored_dtype(path, header, f"{prefix}weight", layer.weight.dtype)
        grouped = _dequantized_weight(path, slot, packed, widths, scales, dtype, device)
        replace_submodule(model, slot.name, float_layer(layer, layer.ungrouped(grouped)))
    left_on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left_on_meta:  # an architecture with state the file does not hold; never silently garbage
        raise PackedFileError(f"{path}: model {header['model']!r} has tensors the file does not hold: {left_on_meta}")
    return model.to(device).eval()


# ---- size accounting and inspection -----------------------------------------------------------


@dataclass
class LayerSummary:
    name: str
    shape: list[int]
    groups: int
    width_histogram: dict[int, int]
    sparse_groups: int  # stored as a nonzero mask and the nonzero codes
    packed_bytes: int
    float32_bytes: int


@dataclass
class PackedSummary:
    path: str
    file_bytes: int
    packed_bytes: int  # the codes stream: each group dense, or mask plus nonzero codes
    group_metadata_bytes: int  # one width byte and one float32 scale per group
    plain_bytes: int  # tensors stored as they are
    float32_bytes: int  # the same model with every quantized weight in float32
    layers: list[LayerSummary]

    @property
    def overhead_bytes(self) -> int:
        return self.file_bytes - self.packed_bytes - self.group_metadata_bytes - self.plain_bytes

    @property
    def average_bits(self) -> float:
        weights = sum(layer.float32_bytes for layer in self.layers) / 4
        return 8 * self.packed_bytes / weights if weights else 0.0


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
        raise _unreadable(path, exc) from exc
    return _checked_header(path, metadata, stored_crc)


def summarize(path: str | os.PathLike) -> PackedSummary:
    """Read a packed file and account for every byte of it."""
    path = Path(path)
    packed_file = _read(path)
    layers = []
    for slot, packed, width_bytes, _ in _packed_layers(packed_file):
        widths, sparse = codec.split_width_bytes(width_bytes)
        histogram: dict[int, int] = {}
        for width in widths.tolist():
            histogram[width] = histogram.get(width, 0) + 1
        layers.append(LayerSummary(slot.name, list(slot.shape), slot.groups, dict(sorted(histogram.items())),
                                   int(sparse.sum()), packed.numel(), 4 * slot.numel))
    plain = sum(t.numel() * t.element_size() for key, t in packed_file.tensors.items() if key.startswith(_STATE_PREFIX))
    groups = sum(layer.groups for layer in layers)
    return PackedSummary(
        path=str(path),
        file_bytes=path.stat().st_size,
        packed_bytes=sum(layer.packed_bytes for layer in layers),
        group_metadata_bytes=5 * groups,
        plain_bytes=plain,
        float32_bytes=sum(layer.float32_bytes for layer in layers) + plain,
        layers=layers,
    )


def format_summary(summary: PackedSummary) -> str:
    """The table `sgsc inspect` prints: one row per quantized layer, then the totals."""
    rows = [f"{'layer':<28} {'shape':<18} {'groups':>6}  {'bits histogram (width:groups)':<34} {'sparse':>6} "
            f"{'bytes':>10} {'share':>6}"]
    total = summary.file_bytes
    for layer in summary.layers:
        histogram = " ".join(f"{w}:{n}" for w, n in layer.width_histogram.items())
        rows.append(
            f"{layer.name:<28} {'x'.join(map(str, layer.shape)):<18} {layer.groups:>6}  {histogram:<34} "
            f"{layer.sparse_groups:>6} {layer.packed_bytes:>10} {100 * layer.packed_bytes / total:>5.1f}%"
        )
    rows += [
        "",
        f"packed weights (per group ceil(width x L / 8), or for sparse groups a mask of ceil(L / 8) and the "
        f"nonzero codes): {summary.packed_bytes} bytes, "
        f"{summary.average_bits:.3f} bits per weight",
        f"per-group widths and scales: {summary.group_metadata_bytes} bytes",
        f"other tensors stored as they are (biases, norms, embeddings): {summary.plain_bytes} bytes",
        f"file header and framing: {summary.overhead_bytes} bytes",
        f"on disk: {summary.file_bytes} bytes = {100 * summary.file_bytes / summary.float32_bytes:.2f}% of the "
        f"tensors of this architecture in float32 ({summary.float32_bytes} bytes; after physical pruning that is "
        "the pruned architecture, smaller than the original float model)",
    ]
    return "\n".join(rows)
