"""The packed model file: export a trained sgsc model, inspect it, load it back as a runnable model.

The file is a safetensors file (no pickle: loading can never run code). For every quantized layer
it holds the integer codes of each group packed at the group's *smallest* width (``sgsc.ops.pack``),
the widths and the per-group scales ``2^e``; every other tensor of the state dict (biases, norms,
embeddings, batch-norm statistics) is stored as it is. A JSON header in the safetensors metadata
names the format and version, the model's registry name and config, and each layer's shape, group
count and CRC-32s. docs/FORMAT.md specifies all of it.

The layout is device-independent: loading unpacks on whatever device the model goes to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from sgsc import ops
from sgsc._io import atomic_write
from sgsc.layers import QConv2d, QLinear, quantized_layers, replace_submodule
from sgsc.models import build_model, model_name
from sgsc.reference import group_params

FORMAT_NAME = "sgsc-packed"
FORMAT_VERSION = 1
MAX_WIDTH = 32
_QUANT_PREFIX = "quantized."
_PLAIN_PREFIX = "tensor."
HEADER_CRC_TENSOR = "header.crc32"


class PackedFileError(ValueError):
    """A file that is not a valid sgsc packed model (truncated, corrupt, wrong format or version)."""


# ---- integer codes and widths ----------------------------------------------------------------


@torch.no_grad()
def integer_codes(layer: QLinear | QConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers ``r`` of eq. (1) for every weight of ``layer`` and the per-group scales ``2^e``.

    Computed with the same float32 arithmetic as the forward kernels (checked bit for bit against
    them in the tests), so ``r * scale`` reproduces ``layer.quantized_weight()`` exactly.
    Returns int64 codes of shape ``(G, L)`` (zeros for pruned groups) and float32 scales ``(G,)``.
    """
    groups = layer.quant_groups
    group_len = layer.weight.numel() // groups if groups else 0
    bits, exponent = layer.bits.detach().float(), layer.exponent.detach().float()
    scale, inv_scale, lo, hi, kept_bits = group_params(bits, exponent)
    scaled = layer.weight.detach().float().reshape(groups, group_len) * scale.unsqueeze(1)
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


# ---- export -----------------------------------------------------------------------------------


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _pack_layer(name: str, layer: QLinear | QConv2d) -> tuple[dict[str, torch.Tensor], dict]:
    codes, scales = integer_codes(layer)
    widths = minimal_widths(codes)
    too_wide = (widths > MAX_WIDTH).nonzero().flatten()
    if too_wide.numel():
        g = int(too_wide[0])
        raise ValueError(
            f"layer {name!r} group {g} needs {int(widths[g])} bits: at b >= 32 the float32 clamp bound "
            "2^31 - 1 rounds to 2^31; lower that group's bit depth before exporting"
        )
    widths = widths.to(torch.uint8).cpu()
    # a layer whose groups were all removed (a block with no heads left) has nothing to pack
    packed = ops.pack(codes.to(torch.int32).cpu(), widths) if layer.quant_groups else torch.empty(0, dtype=torch.uint8)
    scales = scales.cpu().contiguous()
    tensors = {f"{_QUANT_PREFIX}{name}.packed": packed, f"{_QUANT_PREFIX}{name}.widths": widths, f"{_QUANT_PREFIX}{name}.scales": scales}
    entry = {
        "kind": type(layer).__name__,
        "shape": list(layer.weight.shape),
        "dtype": str(layer.weight.dtype).removeprefix("torch."),
        "groups": layer.quant_groups,
        "packed_bytes": packed.numel(),
        "crc32": {"packed": _crc32(packed), "widths": _crc32(widths), "scales": _crc32(scales)},
    }
    return tensors, entry


def _quantized_state_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, _ in quantized_layers(model):
        prefix = f"{name}." if name else ""
        keys.update(f"{prefix}{p}" for p in ("weight", "bits", "exponent"))
    return keys


def build_packed_state(model: nn.Module, data: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON header of ``model``'s packed file, all on the CPU.

    ``data`` (optional, JSON-able) records what the model was trained on, e.g.
    ``{"name": "digits", "dir": None, "seed": 0}``, so `sgsc eval` can score it on the same split.
    """
    layers = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in quantized_layers(model):
        layer_tensors, layers[name] = _pack_layer(name, layer)
        tensors.update(layer_tensors)
    skip = _quantized_state_keys(model)
    plain_crc = {}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        stored = value.detach().cpu().contiguous()
        tensors[f"{_PLAIN_PREFIX}{key}"] = stored
        plain_crc[key] = _crc32(stored)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": model_name(model),
        "config": dataclasses.asdict(model.config),
        "layers": layers,
        "tensors_crc32": plain_crc,
    }
    if data is not None:
        header["data"] = data
    return tensors, header


def export_packed(model: nn.Module, path: str | os.PathLike, *, data: dict | None = None) -> "PackedSummary":
    """Write ``model`` (an sgsc zoo model) as a packed file at ``path``, atomically.

    ``data`` optionally records the training data (see :func:`build_packed_state`). Returns the
    size accounting of what was written.
    """
    tensors, header = build_packed_state(model, data)
    header_json = json.dumps(header, sort_keys=True)
    # The CRC rides in a tensor, not a second metadata key: safetensors writes metadata keys in hash
    # order, and with a single key the same model always gives the same bytes.
    tensors[HEADER_CRC_TENSOR] = torch.tensor([zlib.crc32(header_json.encode())], dtype=torch.int64)
    payload = safetensors_save(tensors, metadata={"sgsc": header_json})
    atomic_write(path, payload)
    return summarize(Path(path))


# ---- reading and validating -----------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise FileNotFoundError(f"no packed model file at {path}")
    data = path.read_bytes()
    try:
        tensors = safetensors_load(data)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, ValueError, OSError) as exc:
        raise PackedFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if "sgsc" not in metadata:
        raise PackedFileError(f"{path} is a safetensors file but not an sgsc packed model (no 'sgsc' header)")
    stored_crc = tensors.pop(HEADER_CRC_TENSOR, None)
    if stored_crc is None or stored_crc.dtype != torch.int64 or stored_crc.shape != (1,):
        raise PackedFileError(f"{path}: the header checksum tensor {HEADER_CRC_TENSOR!r} is missing or malformed")
    if int(stored_crc) != zlib.crc32(metadata["sgsc"].encode()):
        raise PackedFileError(f"{path}: the sgsc header fails its CRC-32 check (corrupt header)")
    try:
        header = json.loads(metadata["sgsc"])
    except json.JSONDecodeError as exc:
        raise PackedFileError(f"{path}: the sgsc header is not valid JSON (corrupt header): {exc}") from exc
    _check_header(path, header)
    return tensors, header


def _check_header(path: Path, header: dict) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise PackedFileError(f"{path}: header format is {header.get('format') if isinstance(header, dict) else header!r}, expected {FORMAT_NAME!r}")
    if header.get("version") != FORMAT_VERSION:
        raise PackedFileError(
            f"{path}: format version {header.get('version')!r} is not supported by this sgsc (reads version {FORMAT_VERSION})"
        )
    for key in ("model", "config", "layers", "tensors_crc32"):
        if key not in header:
            raise PackedFileError(f"{path}: header lacks {key!r}")


def _layer_tensors(path: Path, tensors: dict, name: str, entry: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        packed, widths, scales = (tensors[f"{_QUANT_PREFIX}{name}.{part}"] for part in ("packed", "widths", "scales"))
    except KeyError as exc:
        raise PackedFileError(f"{path}: layer {name!r} is missing tensor {exc.args[0]!r}") from exc
    groups = entry["groups"]
    if widths.dtype != torch.uint8 or widths.shape != (groups,):
        raise PackedFileError(f"{path}: layer {name!r} widths must be uint8 of shape ({groups},), got {widths.dtype} {tuple(widths.shape)}")
    if scales.dtype != torch.float32 or scales.shape != (groups,):
        raise PackedFileError(f"{path}: layer {name!r} scales must be float32 of shape ({groups},), got {scales.dtype} {tuple(scales.shape)}")
    for part, tensor in (("packed", packed), ("widths", widths), ("scales", scales)):
        if _crc32(tensor) != entry["crc32"][part]:
            raise PackedFileError(f"{path}: layer {name!r} {part} fails its CRC-32 check (corrupt data)")
    if widths.numel() and int(widths.max()) > MAX_WIDTH:
        raise PackedFileError(f"{path}: layer {name!r} has a width above {MAX_WIDTH}")
    return packed, widths, scales


def _dequantized_weight(path: Path, tensors: dict, name: str, entry: dict, device: torch.device) -> torch.Tensor:
    packed, widths, scales = _layer_tensors(path, tensors, name, entry)
    shape = entry["shape"]
    groups = entry["groups"]
    numel = 1
    for size in shape:
        numel *= size
    if groups == 0 or numel == 0:
        return torch.zeros(shape, dtype=getattr(torch, entry["dtype"]), device=device)
    rows_per_group, row_len = shape[0] // groups, numel // shape[0]
    try:
        codes = ops.unpack(packed.to(device), widths.to(device), rows_per_group, row_len)
    except ValueError as exc:
        raise PackedFileError(f"{path}: layer {name!r}: {exc}") from exc
    weight = codes.reshape(groups, -1).to(torch.float32) * scales.to(device).unsqueeze(1)
    return weight.reshape(shape).to(getattr(torch, entry["dtype"]))


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
    tensors, header = _read(path)
    try:
        model = build_model(header["model"], header["config"])
    except (ValueError, TypeError) as exc:
        raise PackedFileError(f"{path}: cannot rebuild model {header['model']!r} from the header's config: {exc}") from exc
    plain_state = {}
    for key, crc in header["tensors_crc32"].items():
        stored = tensors.get(f"{_PLAIN_PREFIX}{key}")
        if stored is None:
            raise PackedFileError(f"{path}: tensor {key!r} is missing")
        if _crc32(stored) != crc:
            raise PackedFileError(f"{path}: tensor {key!r} fails its CRC-32 check (corrupt data)")
        plain_state[key] = stored
    expected_plain = set(model.state_dict()) - _quantized_state_keys(model)
    if set(plain_state) != expected_plain:
        raise PackedFileError(
            f"{path}: stored tensors do not match the model's: missing {sorted(expected_plain - set(plain_state))}, "
            f"unexpected {sorted(set(plain_state) - expected_plain)}"
        )
    try:
        model.load_state_dict(plain_state, strict=False)
    except RuntimeError as exc:
        raise PackedFileError(f"{path}: stored tensors do not fit the rebuilt model: {exc}") from exc
    layers = dict(quantized_layers(model))
    if set(layers) != set(header["layers"]):
        raise PackedFileError(f"{path}: quantized layers in the header {sorted(header['layers'])} do not match the model's {sorted(layers)}")
    for name, layer in layers.items():
        entry = header["layers"][name]
        if list(layer.weight.shape) != entry["shape"] or layer.quant_groups != entry["groups"]:
            raise PackedFileError(f"{path}: layer {name!r} shape/groups in the header do not match the rebuilt model")
        weight = _dequantized_weight(path, tensors, name, entry, device)
        replace_submodule(model, name, float_layer(layer.to(device), weight))
    return model.to(device).eval()


# ---- size accounting and inspection -----------------------------------------------------------


@dataclass
class LayerSummary:
    name: str
    shape: list[int]
    groups: int
    width_histogram: dict[int, int]
    packed_bytes: int
    float32_bytes: int


@dataclass
class PackedSummary:
    path: str
    file_bytes: int
    packed_bytes: int  # sum over groups of ceil(width * L / 8): the theoretical payload
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
    """The validated sgsc header of a packed file (the tensors are checked too)."""
    return _read(Path(path))[1]


def summarize(path: str | os.PathLike) -> PackedSummary:
    """Read a packed file and account for every byte of it."""
    path = Path(path)
    tensors, header = _read(path)
    layers = []
    for name, entry in header["layers"].items():
        _, widths, _ = _layer_tensors(path, tensors, name, entry)
        histogram: dict[int, int] = {}
        for width in widths.tolist():
            histogram[width] = histogram.get(width, 0) + 1
        numel = 1
        for size in entry["shape"]:
            numel *= size
        layers.append(LayerSummary(name, entry["shape"], entry["groups"], dict(sorted(histogram.items())), entry["packed_bytes"], 4 * numel))
    plain = sum(t.numel() * t.element_size() for key, t in tensors.items() if key.startswith(_PLAIN_PREFIX))
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
    rows = [f"{'layer':<28} {'shape':<18} {'groups':>6}  {'bits histogram (width:groups)':<34} {'bytes':>10} {'share':>6}"]
    total = summary.file_bytes
    for layer in summary.layers:
        histogram = " ".join(f"{w}:{n}" for w, n in layer.width_histogram.items())
        rows.append(
            f"{layer.name:<28} {'x'.join(map(str, layer.shape)):<18} {layer.groups:>6}  {histogram:<34} "
            f"{layer.packed_bytes:>10} {100 * layer.packed_bytes / total:>5.1f}%"
        )
    rows += [
        "",
        f"packed weights (theoretical, sum of ceil(width x L / 8) per group): {summary.packed_bytes} bytes, "
        f"{summary.average_bits:.3f} bits per weight",
        f"per-group widths and scales: {summary.group_metadata_bytes} bytes",
        f"other tensors stored as they are (biases, norms, embeddings): {summary.plain_bytes} bytes",
        f"file header and framing: {summary.overhead_bytes} bytes",
        f"on disk: {summary.file_bytes} bytes = {100 * summary.file_bytes / summary.float32_bytes:.2f}% of the "
        f"tensors of this architecture in float32 ({summary.float32_bytes} bytes; after physical pruning that is "
        "the pruned architecture, smaller than the original float model)",
    ]
    return "\n".join(rows)
