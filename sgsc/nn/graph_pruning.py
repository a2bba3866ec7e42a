"""Physical removal of zero-bit units in any architecture, on torch-pruning's dependency graph.

Every model is pruned here, the zoo's two included: it traces ``model(*example_inputs)`` with ``torch_pruning.DependencyGraph`` (install
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

**Folding and silencing.** A zero-bit row outputs its bias. When every reader of the removed
channels is a linear layer with a bias, reached through pointwise ops only (an MLP's hidden unit:
``Linear -> GELU -> Linear``), that constant is folded into the readers' biases (read off one forward
pass), and the pruned model computes what the masked model computes, up to float rounding. Otherwise
(BatchNorm turns the bias into a shift that differs between train and eval mode; a constant cannot be
folded into a following padded conv, as it differs at the border) the removed channels are first
*silenced*: the zero-bit producers' bias entries and the coupled BatchNorm ``weight``/``bias`` entries
(``running_mean`` without an affine weight) are set to zero, and the pruned model computes exactly
what that silenced masked model computes, in train and eval mode: a deliberate change of function (a
constant the size term does not pay for), which the run's next safety check sees. With
``silence=False`` nothing is zeroed or folded and only sets whose constants are already zero go.

**Quantization groups.** A layer with fewer groups than channels loses a group only whole: if one
channel of a group must stay, the group's other channels stay too. A layer never loses its last
channel (one is kept, masked).

**Attention heads.** A ``QCausalSelfAttention`` head whose ``v_proj`` group is zero-bit is removed (its
constant value folded into ``out_proj.bias``). ``QMultiheadAttention``'s
heads must tile ``embed_dim`` (``F.multi_head_attention_forward``), so its zero-bit heads are
reported and kept. Embedding rows (tokens) are never removed.

Every cut Parameter is replaced by a smaller one; given the optimizer, its param groups get the new
Parameter and its per-parameter state (Adam's moments) is cut the same way
(:func:`sgsc.nn.surgery.shrink_parameter`). Anything else holding the old Parameters must be rebuilt.
Everything is decided before the model is touched: an error leaves it as it was.

The torch-pruning adapters (sgsc's pruners, the graph, the trace) are in :mod:`sgsc.nn.graph_trace`, the
zero-propagation analysis in :mod:`sgsc.nn.graph_analysis`; this module plans, cuts and reports.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sgsc.nn.conv_transpose import _QConvTranspose
from sgsc.nn.graph_analysis import _Analysis
from sgsc.nn.graph_trace import (
    EntangledGroup,
    UntraceableModel,
    _CausalAttentionPruner,
    _ConvPruner,
    _DeadGroups,
    _LinearPruner,
    _Trace,
)
from sgsc.nn.layers import (
    QUANTIZED_TYPES,
    QCausalSelfAttention,
    QEmbedding,
    QLinear,
    QMultiheadAttention,
    quantized_layers,
)
from sgsc.nn.recurrent import _QRecurrent
from sgsc.nn.surgery import fold_into_bias, freeze_empty_layers

__all__ = ["KeptUnits", "LayerChange", "PruneReport", "UntraceableModel", "prune_zero_bit_units"]


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
    folds: dict[nn.Module, list[int]]


def _plan_graph(trace: _Trace, model: nn.Module, silence: bool, kept: list[KeptUnits]) -> list[_Plan]:
    graph, plans, visited = trace.graph, [], set()
    for root in _root_modules(trace, model):
        if root in visited:
            continue
        pruner = graph.get_pruner_of_module(root)
        try:
            group = graph.get_pruning_group(root, pruner.prune_out_channels, list(range(pruner.get_out_channels(root))))
        except EntangledGroup as exc:
            kept.extend(_entangled(trace, root, str(exc)))
            continue
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
            plans.append(_Plan(root, sorted(removable), analysis.silenced(removable) if silence else [],
                               analysis.folds(removable) if silence else {}))
    return plans


def _never_cut(model: nn.Module, trace: _Trace) -> list[KeptUnits]:
    """Zero-bit rows of layers sgsc has no cut for: a recurrent layer's matrices (its hidden size is one for
    every gate and both matrices) and transposed convolutions (their output channels are dimension 1)."""
    recurrent = {name for name, module in model.named_modules() if isinstance(module, _QRecurrent)}
    return [KeptUnits(name, "rows" if isinstance(layer, QLinear) else "output channels",
                      trace.dead(layer).nonzero().flatten().tolist(),
                      "a recurrent layer's gate rows are kept" if isinstance(layer, QLinear)
                      else "a transposed convolution's channels are kept")
            for name, layer in quantized_layers(model)
            if (name.rpartition(".")[0] in recurrent or isinstance(layer, _QConvTranspose))
            and bool(trace.dead(layer).any())]


def _entangled(trace: _Trace, root: nn.Module, why: str) -> list[KeptUnits]:
    """The zero-bit rows of a root whose coupled set torch-pruning could not resolve: they stay, masked."""
    if not isinstance(root, QUANTIZED_TYPES) or root.group_by != "output" or not root.quant_groups:
        return []
    rows = trace.dead(root).repeat_interleave(root.weight.shape[0] // root.quant_groups)
    if not bool(rows.any()):
        return []
    return [KeptUnits(trace.names[root], "output channels", rows.nonzero().flatten().tolist(),
                      f"the coupled set cannot be resolved: {why}")]


def _merged(kept: list[KeptUnits]) -> list[KeptUnits]:
    by_reason: dict[tuple, set[int]] = defaultdict(set)
    for unit in kept:
        by_reason[(unit.layer, unit.kind, unit.reason)].update(unit.indices)
    return [KeptUnits(layer, kind, sorted(idx), reason) for (layer, kind, reason), idx in by_reason.items()]


def _plan_heads(model: nn.Module, trace: _Trace, kept: list[KeptUnits]) -> list[tuple[QCausalSelfAttention, list[int]]]:
    """Heads to remove (a zero-bit v group) and heads that stay."""
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
    """Fold the heads' constant values into ``out_proj.bias``, then cut their q/k/v rows (with their
    groups) and ``out_proj`` columns."""
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
def _fold_constants(model: nn.Module, example_inputs, readers: dict[nn.Module, list[int]]) -> None:
    """Add what each reader's removed input columns contribute into its bias, so removing them is exact
    (as the zoo's MLP fold was), instead of silencing their producers.

    The columns' values are read off one forward pass: a zero-bit row outputs its bias, which pointwise
    ops keep constant over every position. Columns that are not constant there are left to silencing.
    The pass runs in eval mode, so it moves no BatchNorm statistics and draws no dropout masks.
    """
    if not readers:
        return
    seen: dict[nn.Module, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda layer, args: seen.setdefault(layer, args[0].detach()))
             for layer in readers]
    modes = {module: module.training for module in model.modules()}
    try:
        _call(model.eval(), example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    for layer, columns in readers.items():
        values = seen[layer].reshape(-1, seen[layer].shape[-1])[:, columns]
        if values.shape[0] and bool((values == values[0]).all()):
            fold_into_bias(layer, torch.tensor(columns, dtype=torch.long), values[0])


def _call(model: nn.Module, example_inputs) -> None:
    if isinstance(example_inputs, Mapping):
        model(**example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        model(example_inputs)
    else:
        model(*example_inputs)


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
    A model that records its own widths (the zoo's configs) defines ``sync_config()``, called after the
    cut. Returns a :class:`PruneReport` of what went and which zero-bit units stay, with the reason; see
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
    kept.extend(_never_cut(model, trace))
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
    _fold_constants(model, example_inputs, {layer: cols for plan in graph_plans for layer, cols in plan.folds.items()})
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
    if callable(getattr(model, "sync_config", None)):  # a model that records its own widths (the zoo's)
        model.sync_config()
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
