"""Parameter surgery shared by the pruner (:mod:`sgsc.nn.graph_pruning`) and the replay of a recorded
pruning (:mod:`sgsc.nn.replay`): index arithmetic, slicing a Parameter together with its optimiser
state, folding a removed unit's constant output into a bias, and freezing what a cut emptied."""

from __future__ import annotations

import torch
from torch import nn

from sgsc.nn.layers import QLinear, quantized_layers


def keep_index(size: int, drop: list[int]) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


@torch.no_grad()
def shrink_parameter(module: nn.Module, name: str, dim: int, keep: torch.Tensor, optimizer) -> None:
    """Keep ``keep`` along ``dim`` of ``module.<name>`` and of its optimiser state.

    A Parameter is replaced by a new one (and swapped in the optimiser), not resized through
    ``.data``: autograd caches a Parameter's shape in its gradient accumulator, which a live graph
    or a DDP reducer may still hold.
    """
    old = getattr(module, name)
    if old is None:
        return
    data = old.detach().index_select(dim, keep.to(old.device)).contiguous()
    if not isinstance(old, nn.Parameter):
        setattr(module, name, data)  # a buffer
        return
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            key: value.index_select(dim, keep.to(value.device)).contiguous()
            if isinstance(value, torch.Tensor) and value.shape == old.shape
            else value
            for key, value in state.items()
        }


@torch.no_grad()
def fold_into_bias(layer: QLinear | nn.Linear, columns: torch.Tensor, constant: torch.Tensor) -> None:
    """Add ``q(W)[:, columns] @ constant`` to ``layer.bias``: what those inputs always contribute."""
    if not columns.numel() or not bool(constant.any()):
        return
    if layer.bias is None:
        raise ValueError("cannot fold a pruned unit's constant output into a layer without bias")
    weight = layer.quantized_weight() if isinstance(layer, QLinear) else layer.weight
    weight = weight.detach()[:, columns.to(layer.weight.device)]
    layer.bias += weight.to(layer.bias.dtype) @ constant.to(layer.bias.dtype)


def freeze_empty_layers(model: nn.Module) -> None:
    """Stop gradients to what a fully pruned layer no longer uses.

    Zero-element Parameters and the quantizers of weightless layers never receive a gradient,
    and DistributedDataParallel would wait for one forever. Call it on a model rebuilt from a
    pruned config too, so it matches the model it was saved from.
    """
    for param in model.parameters():
        if param.numel() == 0:
            param.requires_grad_(False)
    for _, layer in quantized_layers(model):
        if layer.weight.numel() == 0:
            layer.bits.requires_grad_(False)
            layer.exponent.requires_grad_(False)
