"""The architecture of a packed file on the meta device (shapes and dtypes, no storage): a zoo model
rebuilt from its config, or the user's own architecture quantized and cut to the file's record."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sgsc.export.format import dtype_name, layer_slots
from sgsc.export.record import ArchitectureMismatch, Record, first_mismatch, record_of
from sgsc.nn import quantize_model, quantized_layers
from sgsc.nn.convert import is_transposed_linear
from sgsc.nn.replay import cut_to_shapes
from sgsc.nn.zoo import build_model


class ArchitectureTooLarge(ValueError):
    """A config that builds more tensors than the caller allowed (the build stops as soon as it does)."""


class SkipInitOnMeta(TorchFunctionMode):
    """Initialisation of a meta tensor, which has no values to set, returns it untouched.

    On meta, ``normal_`` runs a Python decomposition whose first use imports ``torch._dynamo``:
    seconds of a loading process's start-up spent on values that do not exist. Every
    ``torch.nn.init`` function fills its first argument in place and returns it.

    With ``max_tensors`` it also counts the tensors the build creates (every result that is not a
    view, parameters and buffers among them) and raises :class:`ArchitectureTooLarge` past that: a
    config read from a file may ask for any number of layers, and building each costs real time
    even on meta (about 1 ms per quantized layer), so the build is stopped rather than timed.
    """

    def __init__(self, max_tensors: int | None = None):
        super().__init__()
        self.max_tensors, self.created = max_tensors, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        result = func(*args, **kwargs)
        if self.max_tensors is not None and isinstance(result, torch.Tensor) and result._base is None:
            self.created += 1
            if self.created > self.max_tensors:
                raise ArchitectureTooLarge(f"the config builds more than {self.max_tensors} tensors")
        return result


def rebuild_on_meta(name: str, config: dict, *, max_tensors: int | None = None) -> nn.Module:
    """The model ``name`` rebuilt from ``config`` on the meta device: shapes and dtypes only.

    ``max_tensors`` bounds the tensors the build may create (see :class:`SkipInitOnMeta`).
    """
    with torch.device("meta"), SkipInitOnMeta(max_tensors):
        return build_model(name, config)


def check_matches_architecture(model: nn.Module, rebuilt: nn.Module) -> None:
    """The file describes ``model`` only through its config, so the config must rebuild it exactly."""
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: tuple(value.shape) for key, value in rebuilt.state_dict().items()}
    if ours != theirs or layer_slots(model) != layer_slots(rebuilt):
        differing = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
        raise ValueError(
            "model does not match the architecture its config rebuilds (changed layers, shapes or quantization "
            f"groups); differing state-dict entries: {differing or 'none, but the quantized layers or groups differ'}"
        )


def dtype_exceptions(model: nn.Module, rebuilt: nn.Module) -> dict[str, str]:
    """State-dict entries whose dtype is not the one the rebuilt architecture has (usually none)."""
    theirs = rebuilt.state_dict()
    return {key: dtype_name(value.dtype) for key, value in model.state_dict().items() if value.dtype != theirs[key].dtype}


# ---- any model: the user's float architecture made into the one a file records --------------------


def _to_meta(model: nn.Module) -> None:
    """Parameters and persistent buffers moved to the meta device in place, ties kept; the file supplies
    their values. Non-persistent buffers (a causal mask, rotary tables) stay: no file holds them."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) not in moved:
                    moved[id(param)] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
                module._parameters[name] = moved[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                module._buffers[name] = moved.setdefault(id(buffer), buffer.to("meta"))


def _unpruned_groups(model: nn.Module, record: Record) -> dict[str, int]:
    """Each recorded layer's group count before pruning: pruning removes whole groups, so a group spans as
    many channels as in the file, and the unpruned layer's channels give the count."""
    groups, modules = {}, dict(model.named_modules())
    for layer in record.layers:
        module = modules.get(layer.name)
        weight = getattr(module, "weight", None)
        if is_transposed_linear(module):  # (in, out): quantize_model makes it a linear layer's (out, in)
            weight = weight.t()
        pruned = record.state[layer.key("weight")][0][layer.grouped_axis]
        if isinstance(weight, torch.Tensor) and weight.dim() > 1 and layer.groups and pruned >= layer.groups:
            span = pruned // layer.groups
            channels = weight.shape[layer.grouped_axis]
            if channels % span == 0 and channels:
                groups[layer.name] = channels // span
    return groups


def _unrecorded(model: nn.Module, record: Record) -> list[str]:
    """The modules to leave in float: those with no recorded layer at or under them (named at the top) that hold
    a parameter; modules with none (activations, pooling) have nothing to quantize, and each name given costs
    ``quantize_model`` a test per module."""
    recorded = {""}
    for layer in record.layers:
        parts = layer.name.split(".") if layer.name else []
        recorded.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    skip = []
    for name, module in model.named_modules():
        if name in recorded:
            prefix = f"{name}." if name else ""
            skip.extend(prefix + child_name for child_name, child in module.named_children()
                        if prefix + child_name not in recorded and next(child.parameters(), None) is not None)
    return skip


def prepare_architecture(model: nn.Module, record: Record) -> nn.Module:
    """``model`` (a float architecture, changed in place) on the meta device, quantized as ``record``
    says and cut to its shapes; raises :class:`ArchitectureMismatch` naming the first difference."""
    _to_meta(model)
    roundings = {layer.rounding for layer in record.layers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers quantize_model leaves in float are reported as mismatches below
        try:
            # the new layers are initialised on meta, which for an embedding's normal_ imports torch._dynamo
            # (about a second) to compute values that do not exist
            with SkipInitOnMeta():
                model = quantize_model(model, skip=_unrecorded(model, record),
                                       groups=_unpruned_groups(model, record),
                                       rounding=roundings.pop() if len(roundings) == 1 else "nearest")
        except (ValueError, TypeError) as exc:
            raise ArchitectureMismatch(f"the architecture cannot be quantized as the file records: {exc}") from None
    layers = dict(quantized_layers(model))
    for layer in record.layers:  # the rounding changes no loaded value; it is restored for completeness
        if layer.name in layers:
            layers[layer.name].rounding = layer.rounding
    try:
        cut_to_shapes(model, {key: shape for key, (shape, _) in record.state.items()})
    except ValueError as exc:
        raise ArchitectureMismatch(f"the file's pruning does not apply to the architecture: {exc}") from None
    mismatch = first_mismatch(record, record_of(model))
    if mismatch is not None:
        raise ArchitectureMismatch(mismatch)
    return model
