"""Physical removal of zero-bit units in any architecture, on torch-pruning's dependency graph.

:mod:`sgsc.nn.pruning` knows the zoo's two models by heart. This module handles a user's own
model: it traces ``model(*example_inputs)`` with ``torch_pruning.DependencyGraph`` (install
``sgsc[train]``), which couples every output channel to everything that must shrink with it (BatchNorm
entries, the next layer's input channels, residual additions, concatenations, depthwise convolutions,
flatten into a linear layer), and removes a coupled set only when removing it is **exact**.

**When a coupled set may go.** A set is a *candidate* when it holds a zero-bit unit: an output row of
a quantized conv/linear (or a depthwise conv channel) whose group has ``bits <= 0``, or input columns
of a ``group_by="input"`` layer whose group has ``bits <= 0``. It is removed only if every layer that
keeps computing (a conv/linear reading those channels, which mixes them with channels that stay)
reads exact zeros there, or reads them through zero-bit columns. Whether a channel is exactly zero
is followed along the graph: a zero-bit producer row is zero once *silenced*; BatchNorm, ReLU-like
activations, pooling, reshapes and concatenation keep zero as zero; an addition is zero only when
every term is (so a residual channel with one live producer stays); a product is zero when one
factor is; a depthwise conv's channel is zero when its own group is zero-bit (it multiplies its
input by zeros, so a live producer feeding only it may go too). Any other op (sigmoid-like gates,
softmax, LayerNorm, an unknown custom op) is not assumed to map zero to zero, and the set stays.
Sets that reach the model's output, an embedding's columns, a LayerNorm, a grouped convolution or a
module sgsc has no pruner for also stay. Every zero-bit unit that stays is listed in the report
with the reason.

**Silencing.** A zero-bit row outputs its bias, and BatchNorm turns that into a shift; a constant
cannot be folded into a following padded conv (it differs at the border), so, as in
:mod:`sgsc.nn.pruning`, the removed channels are first *silenced*: the zero-bit producers' bias
entries and the coupled BatchNorm ``weight``/``bias`` entries (``running_mean`` without an affine
weight) are set to zero. The pruned model then
computes exactly what that silenced masked model computes, in train and eval mode. With
``silence=False`` nothing is zeroed and only sets whose constants are already zero go.

**Quantization groups.** A layer with fewer groups than channels loses a group only whole: if one
channel of a group must stay, the group's other channels stay too. A layer never loses its last
channel (one is kept, masked).

**Attention heads.** A ``QCausalSelfAttention`` head whose ``v_proj`` group is zero-bit is removed as
the zoo pruner does (its constant value folded into ``out_proj.bias``). ``QMultiheadAttention``'s
heads must tile ``embed_dim`` (``F.multi_head_attention_forward``), so its zero-bit heads are
reported and kept. Embedding rows (tokens) are never removed.

Every cut Parameter is replaced by a smaller one; given the optimizer, its param groups get the new
Parameter and its per-parameter state (Adam's moments) is cut the same way
(:func:`sgsc.nn.pruning` ``shrink_parameter``). Anything else holding the old Parameters must be rebuilt.
Everything is decided before the model is touched: an error leaves it as it was.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sgsc._deps import require
from sgsc.nn.layers import (
    QUANTIZED_TYPES,
    QCausalSelfAttention,
    QEmbedding,
    QLinear,
    QMultiheadAttention,
    _QConv,
    quantized_layers,
)
from sgsc.nn.pruning import fold_into_bias, freeze_empty_layers, keep_index, shrink_parameter

tp = require("torch_pruning", "train")
_ops = tp.ops

class UntraceableModel(ValueError):
    """torch-pruning cannot follow the model's graph (a custom layer outside autograd, inputs it cannot run on)."""


# ---- report ---------------------------------------------------------------------------------


@dataclass
class LayerChange:
    """One module whose own Parameters shrank: what it lost and its parameter count before/after."""

    layer: str
    removed: dict[str, list[int]]  # "output channels" / "input channels" / "heads" -> indices removed
    parameters_before: int
    parameters_after: int
    groups: list[int] = field(default_factory=list)  # a quantized layer's quantization groups removed


@dataclass
class KeptUnits:
    """Zero-bit units of ``layer`` that stay (masked, not removed), and why."""

    layer: str
    kind: str  # "output channels", "input groups", "heads", "rows"
    indices: list[int]
    reason: str


@dataclass
class PruneReport:
    """What :func:`prune_zero_bit_units` removed and which zero-bit units it had to keep."""

    changes: list[LayerChange] = field(default_factory=list)
    kept: list[KeptUnits] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    @property
    def parameters_removed(self) -> int:
        return self.parameters_before - self.parameters_after

    def __str__(self) -> str:
        lines = [f"parameters: {self.parameters_before} -> {self.parameters_after} (-{self.parameters_removed})"]
        for change in self.changes:
            what = "; ".join(f"{len(idx)} {kind}" for kind, idx in change.removed.items()) or "entries"
            lines.append(f"  removed {what} of {change.layer}: {change.parameters_before} -> {change.parameters_after}")
        for kept in self.kept:
            lines.append(f"  kept zero-bit {kept.kind} {kept.indices} of {kept.layer}: {kept.reason}")
        return "\n".join(lines)


# ---- pruners: torch-pruning's surgery functions for sgsc's layers, optimizer-aware ----------------


def _complement(size: int, idxs: Sequence[int]) -> torch.Tensor:
    return keep_index(size, list(idxs))


def _whole_groups(layer: nn.Module, keep: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the quantization groups that ``keep`` (indices along the grouped axis) keeps.

    Groups are equal runs of the grouped axis; a group must be kept or removed whole, which the
    analysis guarantees, so a partial cut here is a bug and raises.
    """
    per_group = size // layer.quant_groups
    kept_mask = torch.zeros(size, dtype=torch.bool)
    kept_mask[keep] = True
    per = kept_mask.reshape(layer.quant_groups, per_group)
    if bool((per.any(1) != per.all(1)).any()):
        raise ValueError(f"pruning would cut a quantization group of {type(layer).__name__} in part")
    return per.all(1).nonzero().flatten()


class _SgscPruner(tp.pruner.BasePruningFunc):
    """Base of sgsc's pruners: every cut goes through ``shrink_parameter``, which swaps the new Parameter into
    the optimizer and cuts its state."""

    TARGET_MODULES = None

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        super().__init__()
        self.optimizer = optimizer

    def _cut(self, module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
        shrink_parameter(module, name, dim, keep, self.optimizer)

    def _cut_groups(self, layer: nn.Module, keep: torch.Tensor, size: int) -> None:
        if isinstance(layer, QUANTIZED_TYPES):
            groups = _whole_groups(layer, keep, size)
            self._cut(layer, "bits", 0, groups)
            self._cut(layer, "exponent", 0, groups)


class _LinearPruner(_SgscPruner):
    """nn.Linear and QLinear: rows (with their groups when grouped by output) or columns."""

    def prune_out_channels(self, layer: nn.Linear, idxs: Sequence[int]) -> nn.Module:
        keep = _complement(layer.out_features, idxs)
        if getattr(layer, "group_by", "output") == "output":
            self._cut_groups(layer, keep, layer.out_features)
        self._cut(layer, "weight", 0, keep)
        self._cut(layer, "bias", 0, keep)
        layer.out_features = keep.numel()
        return layer

    def prune_in_channels(self, layer: nn.Linear, idxs: Sequence[int]) -> nn.Module:
        keep = _complement(layer.in_features, idxs)
        if getattr(layer, "group_by", "output") == "input":
            self._cut_groups(layer, keep, layer.in_features)
        self._cut(layer, "weight", 1, keep)
        layer.in_features = keep.numel()
        return layer

    def get_out_channels(self, layer: nn.Linear) -> int:
        return layer.out_features

    def get_in_channels(self, layer: nn.Linear) -> int:
        return layer.in_features


class _ConvPruner(_SgscPruner):
    """Ungrouped nn.ConvNd and sgsc's quantized convs."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _complement(layer.out_channels, idxs)
        self._cut_groups(layer, keep, layer.out_channels)
        self._cut(layer, "weight", 0, keep)
        self._cut(layer, "bias", 0, keep)
        layer.out_channels = keep.numel()
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _complement(layer.in_channels, idxs)
        self._cut(layer, "weight", 1, keep)
        layer.in_channels = keep.numel()
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


class _DepthwiseConvPruner(_ConvPruner):
    """A depthwise conv's channel is one unit on both sides: the same function prunes in and out,
    which is how torch-pruning links its input channel to its output channel."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        layer = super().prune_out_channels(layer, idxs)
        layer.in_channels = layer.groups = layer.out_channels
        return layer

    prune_in_channels = prune_out_channels


class _BatchNormPruner(_SgscPruner):
    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _complement(layer.num_features, idxs)
        for name in ("weight", "bias", "running_mean", "running_var"):
            self._cut(layer, name, 0, keep)
        layer.num_features = keep.numel()
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_features

    get_in_channels = get_out_channels


class _CausalAttentionPruner(_SgscPruner):
    """QCausalSelfAttention as one unit of width ``n_embd``: inputs are q/k/v columns, outputs
    ``out_proj`` rows (heads are removed separately, inside the unit)."""

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self._linear = _LinearPruner(optimizer)

    def prune_out_channels(self, layer: QCausalSelfAttention, idxs: Sequence[int]) -> nn.Module:
        self._linear.prune_out_channels(layer.out_proj, idxs)
        layer.n_embd = layer.out_proj.out_features
        return layer

    def prune_in_channels(self, layer: QCausalSelfAttention, idxs: Sequence[int]) -> nn.Module:
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
            self._linear.prune_in_channels(proj, idxs)
        return layer

    def get_out_channels(self, layer: QCausalSelfAttention) -> int:
        return layer.out_proj.out_features

    def get_in_channels(self, layer: QCausalSelfAttention) -> int:
        return layer.q_proj.in_features


class _MultiheadAttentionPruner(_SgscPruner):
    """Makes torch-pruning trace QMultiheadAttention as one unit of width ``embed_dim``. Its width
    cannot shrink (its heads must tile ``embed_dim``), so the analysis never lets a set touching it
    go, and the cut functions are never reached."""

    def prune_out_channels(self, layer: QMultiheadAttention, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("QMultiheadAttention's embed_dim cannot be pruned")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: QMultiheadAttention) -> int:
        return layer.embed_dim

    get_in_channels = get_out_channels


class _Graph(tp.DependencyGraph):
    """torch-pruning's graph with sgsc's pruners for every layer sgsc can cut.

    torch-pruning looks custom pruners up by exact class, while a conv is depthwise per instance;
    overriding the lookup gives depthwise quantized convs the pruner that links in to out.
    """

    def __init__(self, optimizer) -> None:
        super().__init__()
        self.sgsc_pruners = {
            "linear": _LinearPruner(optimizer),
            "conv": _ConvPruner(optimizer),
            "depthwise": _DepthwiseConvPruner(optimizer),
            "bn": _BatchNormPruner(optimizer),
        }
        self.unit_pruners = {
            QCausalSelfAttention: _CausalAttentionPruner(optimizer),
            QMultiheadAttention: _MultiheadAttentionPruner(optimizer),
        }

    def sgsc_pruner_of(self, module) -> _SgscPruner | None:
        if isinstance(module, nn.Linear):
            return self.sgsc_pruners["linear"]
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if _is_depthwise(module):
                return self.sgsc_pruners["depthwise"]
            return self.sgsc_pruners["conv"] if module.groups == 1 else None
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self.sgsc_pruners["bn"]
        return self.unit_pruners.get(type(module))

    def get_pruner_of_module(self, module):
        return self.sgsc_pruner_of(module) or super().get_pruner_of_module(module)


def _is_depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.out_channels == conv.in_channels and conv.out_channels > 1


# ---- which groups count as zero-bit ------------------------------------------------------


class _DeadGroups:
    """Which quantization groups count as zero-bit: ``bits <= 0``, and only those ``only`` lists when given
    (layer name -> group indices). A zero-bit group left out is treated as live, which is always exact."""

    def __init__(self, model: nn.Module, only: Mapping[str, Sequence[int]] | None) -> None:
        self.only = None if only is None else _checked_only(model, only)

    def __call__(self, layer: nn.Module) -> torch.Tensor:
        zero = (layer.bits.detach() <= 0).cpu()
        if self.only is None:
            return zero
        allowed = torch.zeros_like(zero)
        allowed[self.only.get(layer, [])] = True
        return zero & allowed


def _checked_only(model: nn.Module, only) -> dict[nn.Module, list[int]]:
    if not isinstance(only, Mapping):
        raise TypeError(f"only must be a mapping of layer name -> group indices, got {type(only).__name__}")
    layers = dict(quantized_layers(model))
    checked = {}
    for name, groups in only.items():
        if name not in layers:
            raise ValueError(f"only names {name!r}, which is not a quantized layer of the model")
        count = layers[name].quant_groups
        if isinstance(groups, (str, bytes)) or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
            raise TypeError(f"only[{name!r}] must be a sequence of group indices, got {groups!r}")
        if any(not 0 <= g < count for g in groups):
            raise ValueError(f"only[{name!r}] holds group indices outside the layer's {count} groups: {list(groups)}")
        checked[layers[name]] = sorted(set(groups))
    return checked


ALL_ZERO_BIT = _DeadGroups(nn.Module(), None)  # every group at bits <= 0


# ---- tracing --------------------------------------------------------------------------------


class _Trace:
    """Run torch-pruning's trace, leaving the model's modes and ``requires_grad`` flags as they were."""

    def __init__(self, model: nn.Module, example_inputs, optimizer, dead: _DeadGroups = ALL_ZERO_BIT) -> None:
        self.dead = dead
        graph = _Graph(optimizer)
        modes = {module: module.training for module in model.modules()}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        ran: list[nn.Module] = []
        hooks = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in model.modules()]
        try:
            for param in frozen:  # the trace follows autograd, which skips frozen weights
                param.requires_grad_(True)
            with torch.enable_grad():
                graph.build_dependency(model, example_inputs, customized_pruners=graph.unit_pruners, verbose=False)
        except Exception as exc:
            raise UntraceableModel(f"example_inputs: torch-pruning could not trace the model on them: {exc}") from exc
        finally:
            for hook in hooks:
                hook.remove()
            for param in frozen:
                param.requires_grad_(False)
            for module, mode in modes.items():
                module.training = mode
        self.graph = graph
        self.names = {module: name for name, module in model.named_modules()}
        self._check_reached(model, set(ran))

    def _check_reached(self, model: nn.Module, ran: set[nn.Module]) -> None:
        """Every weight layer that ran must be in the graph: one that is not sits behind something
        autograd cannot see (``detach``, ``torch.no_grad``, numpy), so its consumers are unknown."""
        inside_units = {sub for unit in model.modules() if type(unit) in self.graph.unit_pruners
                        for sub in unit.modules() if sub is not unit}
        missing = [self.names[m] or "<model>" for m in model.modules()
                   if m in ran and m not in inside_units and m not in self.graph.module2node
                   and (self.graph.sgsc_pruner_of(m) is not None or isinstance(m, QUANTIZED_TYPES))]
        if missing:
            raise UntraceableModel(
                f"torch-pruning cannot trace the model: layers {missing} ran but their outputs do not reach the "
                "model's outputs through autograd (a custom layer that detaches, uses torch.no_grad or leaves torch?); "
                "nothing was pruned"
            )

    def name(self, node) -> str:
        module = node.module
        if isinstance(module, nn.Parameter):
            return self.graph._param_to_name.get(module, "a parameter")
        if module in self.names:
            return self.names[module] or "<model>"
        return _op_name(node)


def _op_name(node) -> str:
    grad_fn = node.grad_fn
    name = grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else type(node.module).__name__
    return re.sub(r"backward\d*$", "", name.split("::")[-1].lower())


# ---- analysis: which coupled channels may go -----------------------------------------------

# Ops that keep an exactly-zero channel exactly zero (f(0) = 0, channel by channel).
_ZERO_PRESERVING = {
    "relu", "relu6", "hardtanh", "hardswish", "gelu", "silu", "tanh", "leakyrelu", "elu", "neg", "clone",
    "mean", "sum", "avgpool1d", "avgpool2d", "adaptiveavgpool1d", "adaptiveavgpool2d", "maxpool2dwithindices",
    "maxpool1dwithindices", "adaptivemaxpool2d", "permute", "transpose", "t", "unsqueeze", "squeeze", "view",
    "unsafeview", "reshapealias", "expand", "slice", "select", "cat", "split", "splitwithsizes", "unbind",
}
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


# ---- planning and surgery -------------------------------------------------------------------


def _check_arguments(model, example_inputs, optimizer, silence) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, str) or not isinstance(example_inputs, (torch.Tensor, Sequence, Mapping)):
        raise TypeError(f"example_inputs must be a tensor, a sequence or a mapping of inputs, got {type(example_inputs).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if not isinstance(silence, bool):
        raise TypeError(f"silence must be a bool, got {type(silence).__name__}")


def _root_modules(trace: _Trace, model: nn.Module) -> Iterator[nn.Module]:
    """Modules whose output channels start a coupled set: convs, linears and attention units.
    Depthwise convs are not roots (torch-pruning swaps in its own function there; their channels are
    reached from their producer's set), nor is QMultiheadAttention (its width is fixed)."""
    for module in model.modules():
        if module in trace.graph.module2node and type(trace.graph.sgsc_pruner_of(module)) in (
                _LinearPruner, _ConvPruner, _CausalAttentionPruner):
            yield module


@dataclass
class _Plan:
    root: nn.Module
    channels: list[int]
    silence: list[tuple[nn.Module, list[int]]]


def _plan_graph(trace: _Trace, model: nn.Module, silence: bool, kept: list[KeptUnits]) -> list[_Plan]:
    graph, plans, visited = trace.graph, [], set()
    for root in _root_modules(trace, model):
        if root in visited:
            continue
        pruner = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, list(range(pruner.get_out_channels(root))))
        analysis = _Analysis(trace, group, silence)
        visited.update(node.module for node, into, _, _ in analysis.items if not into)
        candidates = {r for r in analysis.members if analysis.zero_bit_units(r)}
        reasons = {r: analysis.blocker(r) for r in candidates}
        removable = {r for r, reason in reasons.items() if reason is None}
        while stays := analysis.conflicts(removable):  # keeping one root can split another group
            for r, reason in stays.items():
                removable.discard(r)
                reasons[r] = reason
        for r in sorted(candidates - removable):
            for layer, kind, idxs in analysis.zero_bit_units(r):
                kept.append(KeptUnits(trace.names[layer], kind, idxs, reasons[r]))
        if removable:
            plans.append(_Plan(root, sorted(removable), analysis.silenced(removable) if silence else []))
    return plans


def _merged(kept: list[KeptUnits]) -> list[KeptUnits]:
    by_reason: dict[tuple, set[int]] = defaultdict(set)
    for unit in kept:
        by_reason[(unit.layer, unit.kind, unit.reason)].update(unit.indices)
    return [KeptUnits(layer, kind, sorted(idx), reason) for (layer, kind, reason), idx in by_reason.items()]


def _plan_heads(model: nn.Module, trace: _Trace, kept: list[KeptUnits]) -> list[tuple[QCausalSelfAttention, list[int]]]:
    """Heads to remove (a zero-bit v group, as the zoo pruner decides) and heads that stay."""
    plans, names, dead = [], trace.names, trace.dead
    for module in model.modules():
        if isinstance(module, QMultiheadAttention):
            heads = dead(module.in_proj).reshape(3, module.num_heads).any(0).nonzero().flatten().tolist()
            if heads:
                kept.append(KeptUnits(names[module], "heads", heads,
                                      "QMultiheadAttention's heads must tile embed_dim, so it cannot drop one"))
        elif isinstance(module, QCausalSelfAttention) and module.n_heads:
            dead_v = dead(module.v_proj).nonzero().flatten().tolist()
            dead_qk = (dead(module.q_proj) | dead(module.k_proj)).nonzero().flatten().tolist()
            if sorted(set(dead_qk) - set(dead_v)):
                kept.append(KeptUnits(names[module], "heads", sorted(set(dead_qk) - set(dead_v)),
                                      "only q/k are zero-bit: the head still adds its (uniformly averaged) values"))
            v_bias = module.v_proj.bias
            if dead_v and module.out_proj.bias is None and v_bias is not None and bool(
                    v_bias.detach().reshape(module.n_heads, -1)[dead_v].any()):
                kept.append(KeptUnits(names[module], "heads", dead_v, "out_proj has no bias to absorb the heads' constant"))
            elif dead_v:
                plans.append((module, dead_v))
    return plans


def _prune_heads(attn: QCausalSelfAttention, heads: list[int], pruner: _LinearPruner) -> list[int]:
    """As :mod:`sgsc.nn.pruning` does for the CharDecoder: fold the heads' constant values into
    ``out_proj.bias``, then cut their q/k/v rows (with their groups) and ``out_proj`` columns."""
    hd = attn.head_dim
    drop = [h * hd + j for h in heads for j in range(hd)]
    if attn.v_proj.bias is not None:
        index = torch.tensor(drop, dtype=torch.long)
        fold_into_bias(attn.out_proj, index, attn.v_proj.bias.detach()[index.to(attn.v_proj.bias.device)])
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        pruner.prune_out_channels(proj, drop)
    pruner.prune_in_channels(attn.out_proj, drop)
    attn.n_heads -= len(heads)
    return drop


@torch.no_grad()
def _silence(targets: list[tuple[nn.Module, list[int]]]) -> None:
    for module, idxs in targets:
        entries = [module.bias]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # without an affine weight, eval mode shifts a zero channel by -mean/std: the mean goes instead
            entries.append(module.weight if module.weight is not None else module.running_mean)
        for entry in entries:
            if entry is not None:
                entry[torch.tensor(idxs, dtype=torch.long, device=entry.device)] = 0


def _own_parameters(model: nn.Module) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters(recurse=False)) for name, module in model.named_modules()}


def prune_zero_bit_units(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence | Mapping,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    silence: bool = True,
    only: Mapping[str, Sequence[int]] | None = None,
) -> PruneReport:
    """Physically remove every zero-bit unit of ``model`` that can go exactly, in place.

    ``example_inputs`` are what torch-pruning traces the model with: ``model(*example_inputs)`` for
    a sequence, ``model(**example_inputs)`` for a mapping, else ``model(example_inputs)``.
    ``optimizer``, when given, gets the new Parameters, and its per-parameter state is cut to match.
    With ``silence`` (the default) the removed channels' constants (bias, BatchNorm shift) are
    zeroed first, and the pruned model equals that silenced masked model in train and eval mode.
    ``only`` (layer name -> group indices) limits the zero-bit groups to those listed; the others
    count as live (a safety check prunes only what was zero-bit at two checks in a row).
    Returns a :class:`PruneReport` of what went and which zero-bit units stay, with the reason; see
    the module docstring for the rules. Raises :class:`UntraceableModel` (a ``ValueError``), leaving
    the model as it was, when torch-pruning cannot trace it.
    """
    _check_arguments(model, example_inputs, optimizer, silence)
    trace = _Trace(model, example_inputs, optimizer, _DeadGroups(model, only))
    names, kept = trace.names, []
    kept.extend(
        KeptUnits(name, "rows", trace.dead(layer).nonzero().flatten().tolist(), "embedding rows are kept")
        for name, layer in quantized_layers(model) if isinstance(layer, QEmbedding) and bool(trace.dead(layer).any())
    )
    head_plans = _plan_heads(model, trace, kept)
    graph_plans = _plan_graph(trace, model, silence, kept)

    before = _own_parameters(model)
    removed: dict[str, dict[str, list[int]]] = defaultdict(dict)
    linear = trace.graph.sgsc_pruners["linear"]
    for attn, heads in head_plans:
        removed[names[attn]]["heads"] = heads
        channels = _prune_heads(attn, heads, linear)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            removed[names[proj]]["output channels"] = channels
        removed[names[attn.out_proj]]["input channels"] = channels
    for plan in graph_plans:  # silence everything first: the plans' indices refer to the unpruned model
        _silence(plan.silence)
    for plan in graph_plans:
        pruner = trace.graph.get_pruner_of_module(plan.root)
        group = trace.graph.get_pruning_group(plan.root, pruner.prune_out_channels, plan.channels)
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, nn.Parameter) and module in names:
                kind = "input channels" if item.dep.handler.__name__ == "prune_in_channels" else "output channels"
                removed[names[module]][kind] = sorted(item.idxs)
        group.prune(record_history=False)
    freeze_empty_layers(model)
    after = _own_parameters(model)

    changes = [LayerChange(name, removed.get(name, {}), before[name], after.get(name, 0),
                           _removed_groups(model.get_submodule(name), removed.get(name, {})))
               for name in before if before[name] != after.get(name, 0) or name in removed]
    return PruneReport(changes, _merged(kept), sum(before.values()), sum(after.values()))


def _removed_groups(module: nn.Module, removed: dict[str, list[int]]) -> list[int]:
    """The quantization groups a layer lost, from the channels it lost along its grouping axis
    (whole groups go, so a group spans as many channels after the cut as before)."""
    if not isinstance(module, QUANTIZED_TYPES) or isinstance(module, QEmbedding) or not module.quant_groups:
        return []
    axis, kind = (0, "output channels") if module.group_by == "output" else (1, "input channels")
    span = module.weight.shape[axis] // module.quant_groups
    return sorted({index // span for index in removed.get(kind, [])})


# ---- one bit depth per coupled set ----------------------------------------------------------


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
