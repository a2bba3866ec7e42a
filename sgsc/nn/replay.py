"""Replay a physical pruning on a fresh architecture, from the shapes a packed file or checkpoint records.

A file or checkpoint of a pruned model holds tensors smaller than the user's architecture builds;
which channels went does not matter there, as the file supplies every value. Cutting each module to
the recorded shapes (its first channels kept) gives the architecture those tensors load into.
"""

from __future__ import annotations

import torch
from torch import nn

from sgsc.nn.layers import QUANTIZED_TYPES, QCausalSelfAttention
from sgsc.nn.surgery import shrink_parameter

BATCHNORM_ENTRIES = ("weight", "bias", "running_mean", "running_var")


def _cut(module: nn.Module, name: str, dim: int, size: int) -> None:
    """Keep the first ``size`` entries of ``module.<name>`` along ``dim`` (the caller supplies every value)."""
    shrink_parameter(module, name, dim, torch.arange(size), None)


def _cut_quantizer(layer: nn.Module, channels: int, axis: int) -> None:
    if isinstance(layer, QUANTIZED_TYPES) and layer.group_by == ("output" if axis == 0 else "input"):
        span = layer.weight.shape[axis] // layer.quant_groups
        if channels % span:
            raise ValueError(f"module: cutting {channels} channels would split a quantization group of {span}")
        _cut(layer, "bits", 0, channels // span)
        _cut(layer, "exponent", 0, channels // span)


def _cut_batchnorm(bn: nn.modules.batchnorm._BatchNorm, prefix: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Cut to the recorded size of any of its entries: without running statistics (``track_running_stats=False``)
    only the affine ones exist, and an affine-free one with statistics has only those."""
    recorded = [shapes[prefix + part][0] for part in BATCHNORM_ENTRIES if prefix + part in shapes]
    size = min(recorded, default=bn.num_features)
    if size < bn.num_features:
        for part in BATCHNORM_ENTRIES:
            if getattr(bn, part, None) is not None:
                _cut(bn, part, 0, size)
        bn.num_features = size


def cut_to_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Replay a physical pruning: cut each prunable module to the shapes ``shapes`` gives its state entries.

    The modules and attributes are those :func:`sgsc.nn.graph_pruning.prune_zero_bit_units` cuts:
    linear and ungrouped conv rows (with their quantization groups) and columns, depthwise conv
    channels, BatchNorm entries, and the heads of a ``QCausalSelfAttention``. Which channels remain does
    not matter, as the file supplies every value: each module keeps its first ones. Coupled dimensions
    agree because every entry gets the shape it had in the model that was saved. A module whose shapes
    are not smaller along those axes is left as it is, for the caller's comparison to report.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _cut_batchnorm(module, prefix, shapes)
            continue
        conv = isinstance(module, nn.modules.conv._ConvNd)
        if not (isinstance(module, nn.Linear) or conv) or (prefix + "weight") not in shapes:
            continue
        target, weight = shapes[prefix + "weight"], module.weight
        if len(target) != weight.dim():
            continue
        depthwise = conv and module.groups == module.in_channels == module.out_channels and module.groups > 1
        if conv and module.groups > 1 and not depthwise:
            continue  # grouped convolutions are never pruned
        try:
            if target[0] < weight.shape[0]:
                _cut_quantizer(module, target[0], 0)
                _cut(module, "weight", 0, target[0])
                _cut(module, "bias", 0, target[0])
                if depthwise:
                    module.in_channels = module.groups = target[0]
            if not depthwise and target[1] < weight.shape[1]:
                _cut_quantizer(module, target[1], 1)
                _cut(module, "weight", 1, target[1])
        except ValueError as exc:
            raise ValueError(f"{name or '<model>'}: {exc}") from None
        if conv:
            module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
        else:
            module.out_features, module.in_features = module.weight.shape
    for module in model.modules():
        if isinstance(module, QCausalSelfAttention):
            module.n_heads, module.n_embd = module.q_proj.out_features // module.head_dim, module.out_proj.out_features
