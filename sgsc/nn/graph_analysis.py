"""The zero-propagation analysis of :mod:`sgsc.nn.graph_pruning`: which channels of a coupled set are
exactly zero once silenced, so which zero-bit units may go (the rules are in that module's docstring)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from sgsc.nn.graph_trace import _DeadGroups, _op_name, _ops, _Trace
from sgsc.nn.layers import QUANTIZED_TYPES, QCausalSelfAttention, QLinear, QMultiheadAttention, _QConv

# ---- analysis: which coupled channels may go -----------------------------------------------

# Ops that keep an exactly-zero channel exactly zero (f(0) = 0, channel by channel).
_ZERO_PRESERVING = {
    "relu", "relu6", "hardtanh", "hardswish", "gelu", "silu", "tanh", "leakyrelu", "elu", "neg", "clone",
    "mean", "sum", "avgpool1d", "avgpool2d", "adaptiveavgpool1d", "adaptiveavgpool2d", "maxpool2dwithindices",
    "maxpool1dwithindices", "adaptivemaxpool2d", "permute", "transpose", "t", "unsqueeze", "squeeze", "view",
    "unsafeview", "reshapealias", "expand", "slice", "select", "cat", "split", "splitwithsizes", "unbind",
}
# Ops that map each channel's value on its own, the same in train and eval mode: a constant channel
# through them stays a constant a following linear layer can absorb into its bias.
_POINTWISE = {"relu", "relu6", "hardtanh", "hardswish", "gelu", "silu", "tanh", "leakyrelu", "elu", "neg", "clone"}
_ADDITIVE = {"add", "sub"}
_MULTIPLICATIVE = {"mul", "mm", "addmm", "bmm"}  # mm/addmm: a linear layer's product on 3-D inputs
_STRUCTURAL = (_ops._ReshapeOp, _ops._ConcatOp, _ops._SplitOp, _ops._SliceOp, _ops._ExpandOp, _ops._UnbindOp)


def _zero_bit_rows(layer: nn.Module, dead: _DeadGroups) -> torch.Tensor | None:
    """Bool per output row of a conv/linear: its group is zero-bit; None when the rows carry no
    bits (a float layer, input groups; an embedding's rows are tokens, not the channels it outputs)."""
    if not isinstance(layer, (QLinear, _QConv)) or layer.group_by != "output" or layer.quant_groups == 0:
        return None
    return dead(layer).repeat_interleave(layer.weight.shape[0] // layer.quant_groups)


def _zero_bit_columns(layer: nn.Module, dead: _DeadGroups) -> torch.Tensor | None:
    if not isinstance(layer, QLinear) or layer.group_by != "input" or layer.quant_groups == 0:
        return None
    return dead(layer).repeat_interleave(layer.weight.shape[1] // layer.quant_groups)



def _layer_of(module: nn.Module, into: bool) -> nn.Module | None:
    """The quantized layer whose rows (``into=False``) or columns a unit's channels are: a
    QCausalSelfAttention's outputs are ``out_proj`` rows; its inputs are three layers' columns."""
    if isinstance(module, QCausalSelfAttention):
        return None if into else module.out_proj
    return module


@dataclass
class _Member:
    """A node's part in one coupled channel: the indices it would lose as producer and as consumer."""

    out: set[int] = field(default_factory=set)
    into: set[int] = field(default_factory=set)


class _Analysis:
    """Decide, for one torch-pruning group (all output channels of a root layer), which root
    channels may be removed exactly."""

    def __init__(self, trace: _Trace, group, silence: bool) -> None:
        self.trace, self.graph, self.silence = trace, trace.graph, silence
        self.members: dict[int, dict] = defaultdict(lambda: defaultdict(_Member))
        self.items = []
        for item in group:
            node = item.dep.target
            # a pruner whose in- and out-functions are one function (BN, depthwise conv, ops) treats
            # channel c in and out as one unit; only a true "in" cut makes a layer a consumer
            into = item.dep.handler.__name__ == "prune_in_channels"
            self.items.append((node, into, item.idxs, item.root_idxs))
            for idx, root in zip(item.idxs, item.root_idxs):
                member = self.members[root][node]
                (member.into if into else member.out).add(idx)
        self._param_only: dict = {}

    def _is_layer(self, module) -> bool:
        return not isinstance(module, nn.Parameter) and module in self.trace.names

    def param_only(self, node) -> bool:
        """Computed from parameters alone (a quantized weight's fake-quantize path, a transposed
        weight): such inputs of a layer are its weights, not channels it reads."""
        if node not in self._param_only:
            is_op = not isinstance(node.module, nn.Parameter) and not self._is_layer(node.module)
            self._param_only[node] = is_op and all(self.param_only(n) for n in node.inputs)
        return self._param_only[node]

    def _activations(self, node) -> list:
        return [n for n in node.inputs if not self.param_only(n)]

    # -- is a channel exactly zero (once silenced)? None for "zero", else the reason it is not.

    def nonzero_reason(self, root: int, node) -> str | None:
        module, name = node.module, self.trace.name(node)
        member = self.members[root][node]
        if isinstance(module, nn.Parameter):
            return f"coupled to parameter {name}"
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, QCausalSelfAttention)):
            layer = _layer_of(module, into=False)
            rows, idxs = _zero_bit_rows(layer, self.trace.dead), sorted(member.out)
            if rows is None or not idxs or not bool(rows[idxs].all()):
                return f"coupled to a live channel of {name}"
            if not self.silence and layer.bias is not None and bool(layer.bias.detach()[idxs].any()):
                return f"{name}'s zero-bit channels output their non-zero bias (silence=False)"
            return None
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not self.silence and _bn_shifts(module, sorted(member.out)):
                return f"BatchNorm {name} shifts the channel (silence=False)"
            return self._all_zero(root, node)
        if isinstance(module, _STRUCTURAL):
            return self._all_zero(root, node)
        if isinstance(module, _ops._ElementWiseOp):
            op = _op_name(node)
            if op in _ADDITIVE:
                reason = self._all_zero(root, node)
                return None if reason is None else f"coupled through a residual {op} to {reason.removeprefix('coupled to ')}"
            if op in _MULTIPLICATIVE:  # a product is zero when one factor is
                reasons = [self.nonzero_reason(root, n) for n in self._activations(node) if n in self.members[root]]
                return None if None in reasons else (" and ".join(reasons) or f"{op} of parameters only")
            if op in _ZERO_PRESERVING:
                return self._all_zero(root, node)
            return f"passes through {op}, which sgsc does not assume maps 0 to 0"
        if isinstance(module, nn.Embedding):
            return f"coupled to the columns of embedding {name} (embedding rows are kept)"
        return f"coupled to {type(module).__name__} {name}"

    def _all_zero(self, root: int, node) -> str | None:
        inputs = self._activations(node)
        if not inputs:
            return f"{self.trace.name(node)} of parameters only"
        for n in inputs:
            if n not in self.members[root]:
                return f"coupled to {self.trace.name(n)}, outside the coupled set"
            reason = self.nonzero_reason(root, n)
            if reason is not None:
                return reason
        return None

    # -- may a root channel go?

    def blocker(self, root: int) -> str | None:
        """Why removing root channel ``root`` (with everything coupled) would not be exact, or None."""
        members = self.members[root]
        for node in members:  # structural reasons first: they hold whatever the bits are
            module, name = node.module, self.trace.name(node)
            # torch-pruning adds an output node only when the output comes from an op; a model ending
            # in a layer (a classifier's head) leaves that layer without consumers
            if isinstance(module, _ops._OutputOp) or (not node.outputs and members[node].out):
                return "feeds the model output"
            if isinstance(module, nn.Parameter):
                return f"coupled to parameter {name}"
            if isinstance(module, QMultiheadAttention):
                return f"coupled to QMultiheadAttention {name}, whose embed_dim cannot shrink"
            if isinstance(module, nn.Embedding):
                return f"coupled to the columns of embedding {name} (embedding rows are kept)"
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                return f"normalised together with other channels by {type(module).__name__} {name}"
            if self._is_layer(module) and self.graph.sgsc_pruner_of(module) is None:
                what = "grouped or transposed convolution" if isinstance(module, nn.modules.conv._ConvNd) else type(module).__name__
                return f"coupled to {what} {name}, which sgsc does not prune"
            if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
                return f"coupled to transposed convolution {name}, which sgsc does not prune"
            next_functions = getattr(node.grad_fn, "next_functions", ())
            if isinstance(module, _ops._ElementWiseOp) and any(f[0] is None for f in next_functions):
                return f"combined at {_op_name(node)} with a tensor the graph cannot see (a model input or a buffer)"
        for node, member in members.items():  # every layer that keeps computing must read zeros
            if member.into and not _masked_columns(node.module, member.into, self.trace.dead):
                for n in self._activations(node):
                    reason = self.nonzero_reason(root, n) if n in members else f"reads {self.trace.name(n)}"
                    if reason is not None:
                        return reason
        return None

    def zero_bit_units(self, root: int) -> list[tuple[nn.Module, str, list[int]]]:
        """The zero-bit units among root channel ``root``'s members: (layer, kind, indices)."""
        units = []
        for node, member in self.members[root].items():
            if not self._is_layer(node.module):
                continue
            rows = _zero_bit_rows(_layer_of(node.module, into=False), self.trace.dead)
            if rows is not None and member.out and bool(rows[sorted(member.out)].all()):
                units.append((node.module, "output channels", sorted(member.out)))
            if member.into and _masked_columns(node.module, member.into, self.trace.dead):
                units.append((node.module, "input columns", sorted(member.into)))
        return units

    # -- whole quantization groups, non-empty layers

    def conflicts(self, removable: set[int]) -> dict[int, str]:
        """Removable roots that must stay after all: they share a quantization group with a channel
        that stays, or they would empty a layer."""
        stays: dict[int, str] = {}
        owners: dict[tuple, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        for node, into, idxs, roots in self.items:
            if self._is_layer(node.module):
                for idx, root in zip(idxs, roots):
                    owners[(node, into)][idx].add(root)
        for (node, into), by_index in owners.items():
            module, name = node.module, self.trace.name(node)
            removed = {idx: roots & removable for idx, roots in by_index.items() if roots & removable}
            pruner = self.graph.get_pruner_of_module(module)
            size = pruner.get_in_channels(module) if into else pruner.get_out_channels(module)
            if removed and len(removed) >= size:
                stays[min(min(roots) for roots in removed.values())] = f"the last channel of {name} is kept"
            layer = _layer_of(module, into)
            if not isinstance(layer, QUANTIZED_TYPES) or layer.group_by != ("input" if into else "output"):
                continue
            per_group = size // layer.quant_groups
            for g in range(layer.quant_groups):
                span = set(range(g * per_group, (g + 1) * per_group))
                if span & removed.keys() and not span <= removed.keys():
                    for idx in span & removed.keys():
                        for root in removed[idx]:
                            stays.setdefault(root, f"quantization group {g} of {name} also holds channels that stay")
        return stays

    def folds(self, roots: set[int]) -> dict[nn.Module, list[int]]:
        """Where the removed channels' constants can go instead of being silenced: the linear layers
        reading them (layer -> input columns), when every root's set is zero-bit linear rows with a bias,
        pointwise ops and linear readers with a bias. A constant cannot be folded into a padded conv
        (it differs at the border) nor through BatchNorm (train and eval differ), so those sets are
        silenced. Empty when any root's set is not of that form."""
        readers: dict[nn.Module, set[int]] = defaultdict(set)
        for root in roots:
            for node, member in self.members[root].items():
                module = node.module
                if member.into and isinstance(module, nn.Linear) and module.bias is not None:
                    readers[module].update(member.into)
                elif member.into:
                    return {}
                elif self._is_layer(module):
                    if not isinstance(module, nn.Linear) or module.bias is None:
                        return {}
                elif not (self.param_only(node) or isinstance(module, _STRUCTURAL) or self._pointwise(node)):
                    return {}
        return {module: sorted(columns) for module, columns in readers.items()}

    def _pointwise(self, node) -> bool:
        """A pointwise op of one activation, or a linear layer's product with its (parameter-only) weight."""
        op = _op_name(node) if isinstance(node.module, _ops._ElementWiseOp) else None
        return op in _POINTWISE | {"mm", "addmm"} and len(self._activations(node)) == 1

    def silenced(self, roots: set[int]) -> list[tuple[nn.Module, list[int]]]:
        """What silencing zeroes for these roots: zero-bit producers' bias rows, BatchNorm entries."""
        targets = []
        for root in roots:
            for node, member in self.members[root].items():
                module = node.module
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    targets.append((module, sorted(member.out)))
                elif self._is_layer(module) and member.out:
                    layer = _layer_of(module, into=False)
                    rows = _zero_bit_rows(layer, self.trace.dead)
                    if rows is not None and bool(rows[sorted(member.out)].all()):
                        targets.append((layer, sorted(member.out)))
        return targets


def _bn_shifts(bn: nn.Module, idxs: list[int]) -> bool:
    """Whether BatchNorm maps a zero channel to non-zero: ``beta``, or ``-gamma * mean / std`` in eval."""
    if bn.bias is not None and bool(bn.bias.detach()[idxs].any()):
        return True
    if bn.running_mean is None:
        return False
    gamma = bn.weight.detach()[idxs] if bn.weight is not None else 1.0
    return bool((bn.running_mean[idxs] * gamma).any())


def _masked_columns(module, idxs, dead: _DeadGroups) -> bool:
    """Whether a layer reads these input channels through zero-bit input groups only."""
    columns = _zero_bit_columns(module, dead) if isinstance(module, nn.Module) else None
    return columns is not None and bool(columns[sorted(idxs)].all())
