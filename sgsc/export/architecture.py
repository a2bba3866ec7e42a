"""The architecture a packed file names, rebuilt on the meta device: shapes and dtypes, no storage."""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sgsc.export.format import dtype_name, layer_slots
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
