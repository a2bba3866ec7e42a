"""Physical removal of zero-bit units during a run, for every model the same way.

A :class:`Pruner` is the two calls a safety check makes: which units are dead, and remove them.
:func:`graph_pruner` removes them on torch-pruning's dependency graph
(:func:`sgsc.nn.graph_pruning.prune_zero_bit_units`), the zoo's models included, and reports the
zero-bit groups it had to keep. Without torch-pruning (``sgsc[train]`` not installed) there is no
pruner and zero-bit groups stay masked: they compute exact zeros and cost no bits.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sgsc.nn import quantized_layers

# Units to remove: layer name -> sorted zero-bit group indices. Plain lists of ints, so rank 0 can broadcast them.
Units = dict[str, list[int]]
Snapshot = dict[str, torch.Tensor]  # layer name -> its bits at the last check that passed (CPU, float32)


@dataclass(frozen=True)
class Pruner:
    """Physical removal of zero-bit units for the architectures it knows: the two calls a check makes.

    ``dead_units(model, bits=None) -> Units``: the removable units whose bits are zero (judged by
    ``bits``, a :func:`bits_snapshot`, when given); ``prune(model, optimizer, units) -> Units``:
    remove them in place, swapping every cut Parameter (and its state) in ``optimizer``.
    """

    dead_units: Callable[..., Units]
    prune: Callable[..., Units]


def graph_pruner(example_inputs: Callable[[], Any]) -> Pruner:
    """A :class:`Pruner` for any architecture, on :func:`sgsc.nn.graph_pruning.prune_zero_bit_units`.

    Units are layer name -> zero-bit quantization groups; ``prune`` removes those of them that can go
    exactly (with everything coupled) and returns the groups it removed. ``example_inputs()`` gives
    what torch-pruning traces the model with (a tensor, a sequence of positional inputs or a mapping
    of keyword inputs). A model torch-pruning cannot trace is warned about once and then pruned no
    more: its zero-bit groups stay masked, and the checks report them as kept.
    """

    untraceable: list[str] = []

    def prune(model: nn.Module, optimizer: torch.optim.Optimizer | None, units: Units) -> Units:
        from sgsc.nn.graph_pruning import UntraceableModel, prune_zero_bit_units

        if untraceable:
            return {}
        try:
            report = prune_zero_bit_units(model, example_inputs(), optimizer, only=units)
        except UntraceableModel as exc:  # hours into a run, masking is better than a crash: say it once
            untraceable.append(str(exc))
            warnings.warn(f"sgsc: zero-bit groups stay masked for the rest of the run, since {exc}", stacklevel=4)
            return {}
        return {change.layer: change.groups for change in report.changes if change.groups}

    return Pruner(zero_bit_groups, prune)


def default_pruner(example_inputs: Callable[[], Any]) -> Pruner | None:
    """:func:`graph_pruner` on ``example_inputs``, or None when torch-pruning (``sgsc[train]``) is not installed."""
    return graph_pruner(example_inputs) if importlib.util.find_spec("torch_pruning") is not None else None


def common_units(a: Units, b: Units) -> Units:
    """Units present in both ``a`` and ``b`` (dead now and dead at an earlier check, say)."""
    both = {key: sorted(set(a[key]) & set(b.get(key, ()))) for key in a}
    return {key: value for key, value in both.items() if value}


def zero_bit_groups(model: nn.Module, bits: Snapshot | None = None) -> dict[str, list[int]]:
    """Every quantized layer's groups at ``bits <= 0`` (layer name -> group indices): what computes zeros.

    ``bits`` (a :func:`bits_snapshot`) judges instead of the layers' own bits."""
    groups = {}
    for name, layer in quantized_layers(model):
        dead = ((layer.bits if bits is None else bits[name]).detach() <= 0).nonzero().flatten().tolist()
        if dead:
            groups[name] = dead
    return groups
