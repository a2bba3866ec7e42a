"""Coupled-bits helpers for ``exp_shared_bits.py``: the sets of layers whose output channels are coupled
index for index (found on :mod:`sgsc.nn.graph_pruning`'s dependency graph), one shared ``bits``
Parameter per set, or a penalty pulling a set to one bit depth."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sgsc.nn.graph_analysis import _zero_bit_rows
from sgsc.nn.graph_pruning import _check_arguments, _root_modules
from sgsc.nn.graph_trace import ALL_ZERO_BIT, _Trace
from sgsc.nn.layers import QLinear, _QConv


def coupled_producers(model: nn.Module, example_inputs: torch.Tensor | Sequence | Mapping) -> list[list[str]]:
    """Sets of quantized conv/linear layers whose output channels are coupled index for index
    (a residual stream's producers: the channels of each set can only be removed together).

    Only sets of two or more layers with one group per channel are returned, since only there does
    channel ``c`` of every layer share one unit.
    """
    _check_arguments(model, example_inputs, None, True)
    trace = _Trace(model, example_inputs, None)
    sets, visited = [], set()
    for root in _root_modules(trace, model):
        if root in visited:
            continue
        pruner = trace.graph.get_pruner_of_module(root)
        group = trace.graph.get_pruning_group(root, pruner.prune_out_channels, list(range(pruner.get_out_channels(root))))
        producers = []
        for item in group:
            module = item.dep.target.module
            if item.dep.handler.__name__ == "prune_in_channels":
                continue
            visited.add(module)
            aligned = list(item.idxs) == list(item.root_idxs)
            if (isinstance(module, QLinear) or isinstance(module, _QConv) and module.groups == 1) and aligned \
                    and _zero_bit_rows(module, ALL_ZERO_BIT) is not None and module.quant_groups == module.weight.shape[0]:
                producers.append(trace.names[module])
        if len(set(producers)) > 1:
            sets.append(sorted(set(producers)))
    return sets


def share_coupled_bits(model: nn.Module, coupled: list[list[str]]) -> None:
    """Give each set of :func:`coupled_producers` one ``bits`` Parameter (the first layer's), in place.

    Exponents stay per layer: they fit each layer's own weight range. Build the optimizer after this.
    """
    for names in coupled:
        first = model.get_submodule(names[0])
        for name in names[1:]:
            model.get_submodule(name).bits = first.bits


def coupled_bits_penalty(model: nn.Module, coupled: list[list[str]]) -> torch.Tensor:
    """The penalty variant: mean over sets and channels of the variance of ``relu(bits)`` across a
    set's layers, which pulls coupled channels to one bit depth without tying them."""
    spreads = [torch.stack([torch.relu(model.get_submodule(n).bits.float()) for n in names]).var(0, unbiased=False).mean()
               for names in coupled]
    return torch.stack(spreads).mean() if spreads else torch.zeros(())
