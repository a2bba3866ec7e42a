"""The architecture record (format version 4): a file for any model, with no registry.

A zoo file names its model and config, and the registry rebuilds every shape from them. Any other
model is described by its record instead: each quantized layer (module path, kind, group count,
grouping axis, rounding), every state-dict entry (key, shape, dtype) in state-dict order, and which
entries are the same tensor as an earlier one (tied weights, a module registered at two names).
The loader turns the user's float architecture into the recorded one (quantized the same way, cut
to the recorded shapes) and refuses it, naming the first mismatch, when it cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sgsc.export.format import STORED_DTYPES, LayerSlot, PackedFileError, dtype_name, quoted, quoted_names, state_key
from sgsc.nn import QConv1d, QConv2d, QEmbedding, QLinear, quantized_layers
from sgsc.nn.conv_transpose import QConvTranspose1d, QConvTranspose2d
from sgsc.nn.layers import GROUP_BY
from sgsc.ops.spec import ROUNDING_MODES

# The quantized kinds a record names, with the weight's dimensions; a subclass is recorded as its base.
LAYER_KINDS = {"QLinear": (QLinear, 2), "QConv1d": (QConv1d, 3), "QConv2d": (QConv2d, 4), "QEmbedding": (QEmbedding, 2),
               "QConvTranspose1d": (QConvTranspose1d, 3), "QConvTranspose2d": (QConvTranspose2d, 4)}
# The dtypes a state entry may have: those a stream may hold, by their torch names.
STATE_DTYPES = {dtype_name(dtype): dtype for dtype in STORED_DTYPES.values()}
RECORD_KEYS = ("layers", "state", "tied")
# torch counts a tensor's elements, and each of its sizes, in int64
MAX_NUMEL = 2**63 - 1
QUANTIZER_PARTS = ("weight", "bits", "exponent")


class ArchitectureMismatch(ValueError):
    """The architecture passed to ``load_packed(model=...)`` is not the one the file records."""


@dataclass(frozen=True)
class LayerRecord:
    name: str
    kind: str
    groups: int
    group_by: str
    rounding: str

    def key(self, part: str) -> str:
        return state_key(self.name, part)

    @property
    def grouped_axis(self) -> int:
        """The weight's dimension the groups run along: output channels (dim 1 of a transposed conv's), or inputs."""
        return LAYER_KINDS[self.kind][0].OUTPUT_AXIS if self.group_by == "output" else 1


@dataclass(frozen=True)
class Record:
    layers: tuple[LayerRecord, ...]
    state: dict[str, tuple[tuple[int, ...], torch.dtype]]  # state-dict order
    tied: dict[str, str]  # key -> the earlier key holding the same tensor

    def to_json(self) -> dict:
        return {
            "layers": [[r.name, r.kind, r.groups, r.group_by, r.rounding] for r in self.layers],
            "state": [[key, list(shape), dtype_name(dtype)] for key, (shape, dtype) in self.state.items()],
            "tied": dict(self.tied),
        }

    def stored_layers(self) -> list[LayerRecord]:
        """The layers whose codes the file stores: a layer tied to an earlier one shares its codes."""
        return [layer for layer in self.layers if layer.key("weight") not in self.tied]

    def slots(self) -> list[LayerSlot]:
        slots, first_group = [], 0
        for layer in self.stored_layers():
            slots.append(LayerSlot(layer.name, self.state[layer.key("weight")][0], layer.groups, first_group))
            first_group += layer.groups
        return slots

    def plain(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The entries stored as they are: neither a quantizer's part nor tied to an earlier entry."""
        quantized = {layer.key(part) for layer in self.layers for part in QUANTIZER_PARTS}
        return {key: value for key, value in self.state.items() if key not in quantized and key not in self.tied}


def _kind(layer: nn.Module) -> str:
    return next(kind for kind, (cls, _) in LAYER_KINDS.items() if isinstance(layer, cls))


def record_of(model: nn.Module) -> Record:
    """What a file records of ``model``: its quantized layers, state-dict shapes and dtypes, and ties."""
    layers = tuple(LayerRecord(name, _kind(layer), layer.quant_groups, layer.group_by, layer.rounding)
                   for name, layer in quantized_layers(model))
    state, tied, first = {}, {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        state[key] = (tuple(value.shape), value.dtype)
        owner = first.setdefault(id(value), key)  # keep_vars: the Parameter itself, so ties compare by identity
        if owner != key:
            tied[key] = owner
    return Record(layers, state, tied)


def problems(record: Record) -> str | None:
    """The first way ``record`` breaks the rules of docs/FORMAT.md (version 4), or None.

    The writer checks the model it is given with this, and the reader every file.
    """
    order = {key: i for i, key in enumerate(record.state)}
    for key, (shape, dtype) in record.state.items():
        if dtype not in STATE_DTYPES.values():
            return f"state entry {quoted(key)} is {dtype_name(dtype)}; a file stores {', '.join(STATE_DTYPES)}"
    names = set()
    for layer in record.layers:
        if layer.name in names:
            return f"layer {quoted(layer.name)} is listed twice"
        names.add(layer.name)
        if layer.kind not in LAYER_KINDS:
            return f"layer {quoted(layer.name)} has kind {quoted(layer.kind)}, not one of {', '.join(LAYER_KINDS)}"
        if layer.group_by not in GROUP_BY or (layer.group_by == "input" and layer.kind != "QLinear"):
            return f"layer {quoted(layer.name)} ({layer.kind}) cannot group by {quoted(layer.group_by)}"
        if layer.rounding not in ROUNDING_MODES:
            return (f"layer {quoted(layer.name)} has rounding {quoted(layer.rounding)}, not one of "
                    f"{', '.join(ROUNDING_MODES)}")
        missing = [layer.key(part) for part in QUANTIZER_PARTS if layer.key(part) not in record.state]
        if missing:
            return f"layer {quoted(layer.name)} has no state entries {quoted_names(missing)}"
        shape, dtype = record.state[layer.key("weight")]
        if len(shape) != LAYER_KINDS[layer.kind][1] or not dtype.is_floating_point:
            return (f"layer {quoted(layer.name)}: a {layer.kind} weight cannot be {dtype_name(dtype)} of shape "
                    f"{quoted(shape)}")
        for part in ("bits", "exponent"):
            if record.state[layer.key(part)] != ((layer.groups,), torch.float32):
                return f"layer {quoted(layer.name)}: its {part} must be float32 of shape ({layer.groups},)"
        axis = shape[layer.grouped_axis]
        if (axis % layer.groups if layer.groups else axis):
            return (f"layer {quoted(layer.name)}: {layer.groups} groups do not divide its {axis} {layer.group_by} "
                    "channels")
    layers_by_key = {layer.key(part): (layer, part) for layer in record.layers for part in QUANTIZER_PARTS}
    for key, owner in record.tied.items():
        if key not in order or owner not in order or order[owner] >= order[key] or owner in record.tied:
            return f"tied entry {quoted(key)} must follow {quoted(owner)}, an untied entry of the state"
        if record.state[key] != record.state[owner]:
            return f"tied entries {quoted(key)} and {quoted(owner)} differ in shape or dtype"
        mine, theirs = layers_by_key.get(key), layers_by_key.get(owner)
        if (mine is None) != (theirs is None) or (mine and mine[1] != theirs[1]):
            return (f"{quoted(key)} shares its tensor with {quoted(owner)}, but they are not the same part of two "
                    "quantized layers "
                    "(a quantized weight is stored as codes; a float layer reading it would read other values)")
    for layer in record.layers:  # layers sharing a weight share its quantizer, so its codes are stored once
        owner = record.tied.get(layer.key("weight"))
        if owner is not None:
            other = layers_by_key[owner][0]
            for part in ("bits", "exponent"):
                if record.tied.get(layer.key(part)) != other.key(part):
                    return f"layers {quoted(other.name)} and {quoted(layer.name)} share a weight but not its {part}"
            if (layer.group_by, layer.rounding) != (other.group_by, other.rounding):
                return (f"layers {quoted(other.name)} and {quoted(layer.name)} share a weight but group or round it "
                        "differently")
    return None


def _fail(path: Path, what: str) -> PackedFileError:
    return PackedFileError(f"{path}: header 'architecture': {what}")


def _is_int(value, low: int = 0) -> bool:
    return type(value) is int and value >= low


def parse(path: Path, document: object) -> Record:
    """The record of a version 4 header, every field checked (strict JSON is already parsed)."""
    if not isinstance(document, dict) or set(document) != set(RECORD_KEYS):
        raise _fail(path, f"must be an object of exactly {', '.join(RECORD_KEYS)}")
    layers, state, tied = (document[key] for key in RECORD_KEYS)
    if not isinstance(layers, list) or not isinstance(state, list) or not isinstance(tied, dict):
        raise _fail(path, "'layers' and 'state' must be lists, 'tied' an object")
    parsed_layers = []
    for entry in layers:
        if not (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str) and isinstance(entry[1], str)
                and _is_int(entry[2]) and isinstance(entry[3], str) and isinstance(entry[4], str)):
            raise _fail(path, f"a layer is [name, kind, groups, group_by, rounding], got {quoted(entry)}")
        parsed_layers.append(LayerRecord(*entry))
    parsed_state = {}
    for entry in state:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], list) and all(_is_int(d) for d in entry[1]) and entry[2] in STATE_DTYPES):
            raise _fail(path, f"a state entry is [key, shape, dtype] with a dtype of {', '.join(STATE_DTYPES)}, "
                              f"got {quoted(entry)}")
        if entry[0] in parsed_state:
            raise _fail(path, f"state entry {quoted(entry[0])} is listed twice")
        if max(entry[1], default=0) > MAX_NUMEL or math.prod(entry[1]) > MAX_NUMEL:
            raise _fail(path, f"state entry {quoted(entry[0])} of shape {quoted(entry[1])} has more elements than a "
                              "tensor holds (2^63 - 1)")
        parsed_state[entry[0]] = (tuple(entry[1]), STATE_DTYPES[entry[2]])
    if not all(isinstance(owner, str) for owner in tied.values()):
        raise _fail(path, "'tied' must map keys to keys")
    record = Record(tuple(parsed_layers), parsed_state, dict(tied))
    problem = problems(record)
    if problem is not None:
        raise _fail(path, problem)
    return record


def _describe_layer(layer: LayerRecord | None) -> str:
    return "no quantized layer" if layer is None else f"{layer.kind} with {layer.groups} groups by {layer.group_by}"


def first_mismatch(expected: Record, found: Record) -> str | None:
    """Where the architecture's record ``found`` first differs from the file's ``expected``, or None.

    Layers first (a different kind of layer also differs in shape, and its kind says more), then the
    state entries in state-dict order, then the ties. A floating entry may differ in dtype: the file's wins.
    """
    theirs = {layer.name: layer for layer in found.layers}
    for layer in expected.layers:
        other = theirs.get(layer.name)
        if other is None or (other.kind, other.groups, other.group_by) != (layer.kind, layer.groups, layer.group_by):
            return (f"module {quoted(layer.name)}: the file has {_describe_layer(layer)}, the architecture "
                    f"{_describe_layer(other)}")
    recorded = {layer.name for layer in expected.layers}
    extra = [name for name in theirs if name not in recorded]
    if extra:
        return (f"module {quoted(extra[0])}: the file has {_describe_layer(None)}, the architecture "
                f"{_describe_layer(theirs[extra[0]])}")
    for key, (shape, dtype) in expected.state.items():
        if key not in found.state:
            return f"state entry {quoted(key)} (shape {quoted(shape)}): the architecture has no such entry"
        other_shape, other_dtype = found.state[key]
        if other_shape != shape:
            return (f"state entry {quoted(key)}: the file has shape {quoted(shape)}, the architecture "
                    f"{quoted(other_shape)}")
        if other_dtype != dtype and not (dtype.is_floating_point and other_dtype.is_floating_point):
            return (f"state entry {quoted(key)}: the file has dtype {dtype_name(dtype)}, the architecture "
                    f"{dtype_name(other_dtype)}")
    extra = [key for key in found.state if key not in expected.state]
    if extra:
        return f"state entry {quoted(extra[0])} (shape {quoted(found.state[extra[0]][0])}): the file has no such entry"
    for key in expected.state:
        if expected.tied.get(key) != found.tied.get(key):
            return (f"state entry {quoted(key)}: the file ties it to {quoted(expected.tied.get(key))}, the "
                    f"architecture to {quoted(found.tied.get(key))}")
    return None
