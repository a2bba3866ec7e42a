"""The safety check of Algorithm 1: restore the bits of recently lowered groups, or prune what stayed at zero.

Every ``k`` steps the preservation set is evaluated (accuracy for classifiers, loss for a language
model). If it is more than ``threshold`` worse than the best value seen since compression began, the
groups whose storage width fell since the last safe check get their bits back (:func:`restore_groups`).
Otherwise the check is safe: the units whose bits have been zero since the previous safe check are
removed physically by the model's :class:`Pruner` (a unit thus survives one check at zero bits, where
restore can still bring it back) and the bits are snapshotted: the zoo's two models by
:mod:`sgsc.nn.pruning`, any other by :func:`graph_pruner` (torch-pruning's dependency graph), which
reports the zero-bit groups it had to keep. Without a pruner (torch-pruning not installed) the zero-bit
groups stay masked (they compute exact zeros and cost no bits), and the check reports them.

:func:`judge` only reads the model (it runs on rank 0 under DDP and its :class:`Decision` is
broadcast); :func:`carry_out` carries it out on every rank. The switches are a :class:`Policy`;
:class:`~sgsc.train.selfcompress.SelfCompression` is their one caller in the library.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sgsc.nn import pruning, quantized_layers, storage_bits
from sgsc.nn.pruning import Units, common_units

Snapshot = dict[str, torch.Tensor]  # layer name -> its bits at the last safe check (CPU, float32)


@dataclass
class RunState:
    """What a run carries from step to step besides model and optimiser, and what a checkpoint keeps of it.

    ``snapshot`` is None until compression starts (after the warm-up); ``best`` is the best
    preservation metric since then (None without a preservation set); ``preservation`` the indices of
    the preservation set in the training data; ``history`` every logged record.
    """

    step: int = 0
    best: float | None = None
    snapshot: Snapshot | None = None
    preservation: list[int] | None = None
    history: list[dict] = field(default_factory=list)

    def to_record(self) -> dict:
        """Plain containers only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {"step": self.step, "best": self.best, "snapshot": self.snapshot, "preservation": self.preservation,
                "history": self.history}

    @classmethod
    def from_record(cls, record: dict) -> RunState:
        return cls(**{key: record[key] for key in ("step", "best", "snapshot", "preservation", "history")})


@dataclass(frozen=True)
class Pruner:
    """Physical removal of zero-bit units for the architectures it knows: the two calls a check makes.

    ``dead_units(model, bits=None) -> Units``: the removable units whose bits are zero (judged by
    ``bits``, a :func:`bits_snapshot`, when given); ``prune(model, optimizer, units) -> Units``:
    remove them in place, swapping every cut Parameter (and its state) in ``optimizer``.
    """

    dead_units: Callable[..., Units]
    prune: Callable[..., Units]


ZOO_PRUNER = Pruner(pruning.dead_units, pruning.prune)


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


def default_pruner(model: nn.Module, example_inputs: Callable[[], Any] | None = None) -> Pruner | None:
    """:mod:`sgsc.nn.pruning` for the zoo's PaperCNN and CharDecoder, :func:`graph_pruner` on
    ``example_inputs`` for any other model, or None when torch-pruning (``sgsc[train]``) is not installed."""
    if pruning.supports(model):
        return ZOO_PRUNER
    if example_inputs is None:
        raise TypeError(f"default_pruner: {type(model).__name__} is not a zoo model, so example_inputs (a callable "
                        "returning the inputs to trace it with) is needed")
    return graph_pruner(example_inputs) if importlib.util.find_spec("torch_pruning") is not None else None


@dataclass(frozen=True)
class Policy:
    """What a safety check does: restore past ``threshold``, prune with ``pruner`` (None: keep masked).

    ``higher_is_better`` is the preservation metric's direction (accuracy: True, loss: False).
    """

    threshold: float
    restore: bool = True
    prune: bool = True
    higher_is_better: bool = True
    pruner: Pruner | None = None


@dataclass
class Decision:
    """A safety check's outcome: ``restore`` (layer -> groups) when the metric dropped, else ``prune`` (units).

    ``masked`` (layer -> groups) replaces ``prune`` when pruning is on but the run has no pruner.
    """

    metric: float | None
    restore: dict[str, list[int]] | None = None
    prune: Units = field(default_factory=dict)
    masked: dict[str, list[int]] | None = None


def bits_snapshot(model: nn.Module) -> Snapshot:
    """Every quantized layer's bits, detached on the CPU: the state of the last safe check."""
    return {name: layer.bits.detach().float().cpu().clone() for name, layer in quantized_layers(model)}


def dropped(metric: float, best: float, threshold: float, higher_is_better: bool) -> bool:
    """Whether the preservation metric fell more than ``threshold`` below the best seen."""
    return metric < best - threshold if higher_is_better else metric > best + threshold


def _improves(metric: float, best: float | None, higher_is_better: bool) -> bool:
    return best is None or (metric > best if higher_is_better else metric < best)


def lowered_groups(model: nn.Module, snapshot: Snapshot) -> dict[str, list[int]]:
    """Groups whose storage width (``ceil(b)``, 0 when pruned) fell since ``snapshot``."""
    lowered = {}
    for name, layer in quantized_layers(model):
        before = snapshot.get(name)
        if before is None or before.shape != layer.bits.shape:
            continue
        groups = (storage_bits(layer.bits.cpu()) < storage_bits(before)).nonzero().flatten().tolist()
        if groups:
            lowered[name] = groups
    return lowered


@torch.no_grad()
def restore_groups(model: nn.Module, optimizer: torch.optim.Optimizer, snapshot: Snapshot,
                   groups: dict[str, list[int]]) -> int:
    """Give ``groups`` back their bits from ``snapshot``; returns how many groups were raised.

    Adam's first moment of each restored bit is zeroed, so stale momentum does not carry it
    straight back down; its second moment (the step-size scale) is kept.
    """
    layers = dict(quantized_layers(model))
    count = 0
    for name, index in groups.items():
        bits = layers[name].bits
        where = torch.tensor(index, dtype=torch.long, device=bits.device)
        bits[where] = snapshot[name].to(bits.device)[where]
        moments = optimizer.state.get(bits, {})
        if "exp_avg" in moments:
            moments["exp_avg"][where] = 0
        count += len(index)
    return count


def zero_bit_groups(model: nn.Module, bits: Snapshot | None = None) -> dict[str, list[int]]:
    """Every quantized layer's groups at ``bits <= 0`` (layer name -> group indices): what computes zeros.

    ``bits`` (a :func:`bits_snapshot`) judges instead of the layers' own bits."""
    groups = {}
    for name, layer in quantized_layers(model):
        dead = ((layer.bits if bits is None else bits[name]).detach() <= 0).nonzero().flatten().tolist()
        if dead:
            groups[name] = dead
    return groups


def judge(model: nn.Module, state: RunState, metric: float | None, policy: Policy) -> Decision:
    """A safety check's decision (taken on rank 0) from the preservation ``metric`` (None: no set).

    The metric dropping more than ``policy.threshold`` below ``state.best`` restores the groups
    lowered since ``state.snapshot``; otherwise the units dead now and at the snapshot are to be
    pruned, or, without a pruner, the zero-bit groups are reported as staying masked.
    """
    best = state.best
    if (policy.restore and metric is not None and best is not None
            and dropped(metric, best, policy.threshold, policy.higher_is_better)):
        return Decision(metric, restore=lowered_groups(model, state.snapshot))
    if not policy.prune:
        return Decision(metric)
    if policy.pruner is None:
        return Decision(metric, masked=zero_bit_groups(model))
    dead = policy.pruner.dead_units
    return Decision(metric, prune=common_units(dead(model), dead(model, state.snapshot)))


def carry_out(model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState, decision: Decision, *,
              higher_is_better: bool, pruner: Pruner | None) -> dict:
    """Carry out :func:`judge`'s decision on this rank; returns the event to log."""
    event = {"kind": "check", "step": state.step, "metric": decision.metric, "best": state.best}
    if decision.restore is not None:
        event["restored"] = restore_groups(model, optimizer, state.snapshot, decision.restore)
        return event
    if decision.metric is not None and _improves(decision.metric, state.best, higher_is_better):
        state.best = decision.metric
    if decision.masked is not None:
        event["masked"] = decision.masked
    else:
        event["pruned"] = pruner.prune(model, optimizer, decision.prune) if decision.prune else {}
        kept = {unit: sorted(set(idx) - set(event["pruned"].get(unit, ()))) for unit, idx in decision.prune.items()}
        if any(kept.values()):  # e.g. coupled to a live channel: sgsc.nn.graph_pruning's report says why
            event["kept"] = {unit: idx for unit, idx in kept.items() if idx}
    state.snapshot = bits_snapshot(model)
    return event
