"""The safety check of Algorithm 1: restore the bits of recently lowered groups, or prune what stayed at zero.

Every ``k`` steps the preservation set is evaluated (accuracy for classifiers, loss for a language
model). If it is more than ``threshold`` worse than the best value seen since compression began, the
groups whose storage width fell since the last safe check get their bits back (:func:`restore_groups`).
Otherwise the check is safe: the units whose bits have been zero since the previous safe check are
removed physically (:mod:`sgsc.nn.pruning`; a unit thus survives one check at zero bits, where restore
can still bring it back) and the bits are snapshotted.

:func:`decide` only reads the model (it runs on rank 0 under DDP and its :class:`Decision` is
broadcast); :func:`apply_decision` carries it out on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import TensorDataset

from sgsc.nn import quantized_layers, storage_bits
from sgsc.nn.pruning import Units, common_units, dead_units, prune
from sgsc.train.config import TrainConfig
from sgsc.train.task import evaluate

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


@dataclass
class Decision:
    """A safety check's outcome: ``restore`` (layer -> groups) when the metric dropped, else ``prune`` (units)."""

    metric: float | None
    restore: dict[str, list[int]] | None = None
    prune: Units = field(default_factory=dict)


def preservation_metric(model: nn.Module, preserved: TensorDataset, language: bool) -> float:
    """What the safety check watches: accuracy on the preservation set, or loss for a language model."""
    result = evaluate(model, preserved)
    return result["loss"] if language else result["accuracy"]


def bits_snapshot(model: nn.Module) -> Snapshot:
    """Every quantized layer's bits, detached on the CPU: the state of the last safe check."""
    return {name: layer.bits.detach().float().cpu().clone() for name, layer in quantized_layers(model)}


def dropped(metric: float, best: float, threshold: float, language: bool) -> bool:
    """Whether the preservation metric fell more than ``threshold`` below the best seen."""
    return metric > best + threshold if language else metric < best - threshold


def _improves(metric: float, best: float | None, language: bool) -> bool:
    return best is None or (metric < best if language else metric > best)


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


def decide(model: nn.Module, config: TrainConfig, state: RunState, preserved: TensorDataset | None,
           language: bool) -> Decision:
    """The safety check's decision (taken on rank 0): what to restore, or what to prune."""
    metric = preservation_metric(model, preserved, language) if preserved is not None else None
    best = state.best
    if config.restore and metric is not None and best is not None and dropped(metric, best, config.threshold, language):
        return Decision(metric, restore=lowered_groups(model, state.snapshot))
    confirmed = common_units(dead_units(model), dead_units(model, state.snapshot)) if config.prune else {}
    return Decision(metric, prune=confirmed)


def apply_decision(model: nn.Module, optimizer, state: RunState, decision: Decision, language: bool) -> dict:
    """Carry out :func:`decide`'s decision on this rank; returns the event to log."""
    event = {"kind": "check", "step": state.step, "metric": decision.metric, "best": state.best}
    if decision.restore is not None:
        event["restored"] = restore_groups(model, optimizer, state.snapshot, decision.restore)
        return event
    if decision.metric is not None and _improves(decision.metric, state.best, language):
        state.best = decision.metric
    event["pruned"] = prune(model, optimizer, decision.prune) if decision.prune else {}
    state.snapshot = bits_snapshot(model)
    return event
