"""torch-pruning adapters for :mod:`sgsc.nn.graph_pruning`: sgsc's pruners (every cut through
``shrink_parameter``, optimizer-aware), the dependency graph that uses them, which quantization groups
count as zero-bit, and the trace of a model (modes and ``requires_grad`` flags left as they were)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from sgsc._deps import require
from sgsc.nn.layers import QUANTIZED_TYPES, QCausalSelfAttention, QMultiheadAttention, quantized_layers
from sgsc.nn.surgery import keep_index, shrink_parameter

tp = require("torch_pruning", "train")
_ops = tp.ops

class UntraceableModel(ValueError):
    """torch-pruning cannot follow the model's graph (a custom layer outside autograd, inputs it cannot run on)."""


class EntangledGroup(Exception):
    """A coupled set whose channels come back permuted each time around a cycle of the graph (rotary halves,
    grouped k/v heads): torch-pruning cannot say which channels couple to which, so the set stays."""


# A coupled set reaches one layer along one direction once per path to it (residual adds, cat/split
# branches): a handful of times. Through rotary attention the channels come back permuted on every pass
# around a cycle, and torch-pruning adds each new permutation until the orbit closes, which on a 2-layer
# Llama took over 10 minutes; past this many arrivals the set is declared entangled.
MAX_ARRIVALS = 32


@contextmanager
def _bounded_arrivals(limit: int) -> Iterator[None]:
    """torch-pruning's group walk, stopped with :class:`EntangledGroup` once one (node, direction) is reached
    ``limit`` times. Its walk is a closure with no hook, so its ``Group.add_dep`` is wrapped for the call."""
    group_type = tp.dependency.group.Group
    add_dep = group_type.add_dep

    def bounded(group, dep, idxs):
        arrivals = group.__dict__.setdefault("_sgsc_arrivals", Counter())
        arrivals[dep.target, dep.handler] += 1
        if arrivals[dep.target, dep.handler] > limit:
            raise EntangledGroup(f"its channels reach {dep.target.name} more than {limit} times, permuted")
        add_dep(group, dep, idxs)

    group_type.add_dep = bounded
    try:
        yield
    finally:
        group_type.add_dep = add_dep


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

    def get_pruning_group(self, module, pruning_fn, idxs):
        """torch-pruning's coupled set of ``module``'s channels ``idxs``; raises :class:`EntangledGroup`
        where its walk would not end in reasonable time."""
        with _bounded_arrivals(MAX_ARRIVALS):
            return super().get_pruning_group(module, pruning_fn, idxs)


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
