"""The architecture a packed file names, rebuilt on the meta device: shapes and dtypes, no storage."""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sgsc.export.format import dtype_name, layer_slots
from sgsc.nn.zoo import build_model


class SkipInitOnMeta(TorchFunctionMode):
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


def rebuild_on_meta(name: str, config: dict) -> nn.Module:
    """The model ``name`` rebuilt from ``config`` on the meta device: shapes and dtypes only."""
    with torch.device("meta"), SkipInitOnMeta():
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
