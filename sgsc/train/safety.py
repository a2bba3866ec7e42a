"""The safety check of Algorithm 1 as a contract: pass and prune, wait, or roll back and change course.

With a contract (a guard set and ``restore``), every ``k`` steps the model is scored on the guard and
compared with the reference, paired, example by example (:mod:`sgsc.train.guard`):

* **pass** (the drop's upper bound is within ``max_drop``): the units whose bits were zero at this
  check and the last one that passed are removed by the model's :class:`~sgsc.train.pruners.Pruner`,
  and the state (weights, exponents, bits, BatchNorm statistics, optimiser state) is kept as the last
  that passed;
* **uncertain**: nothing happens; the run goes on;
* **fail** (the drop's lower bound exceeds ``max_drop``): compression dips before the weights adapt,
  and rolling back at every dip undoes the recovery too, so the run goes on until ``patience``
  checks in a row have failed (an uncertain or passing check breaks the row: the model is
  recovering). Then it rolls back to the last state that passed and changes course so the same drop
  does not come back a few steps later: each layer whose storage width fell since then gets its old
  bits back alone, on the guard, and the layers whose restoring recovered the most are **slowed**:
  their bits move at half the pace they did (each step's change of their bits is scaled by the
  layer's pace, which halves each time it is blamed), so the checks see their compression in
  smaller steps.

Without a contract (unsafe self-compression, or the preservation term alone) a check only prunes.

:func:`judge` only reads the model (it runs on rank 0 under DDP and its :class:`Decision` is
broadcast); :func:`carry_out` carries it out on every rank. The switches are a :class:`Policy`;
:class:`~sgsc.train.selfcompress.SelfCompression` is their one caller in the library.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sgsc.nn import quantized_layers, storage_bits
from sgsc.train.guard import Check, Outcomes, compare, compare_in_looks, first_look, subset
from sgsc.train.pruners import Pruner, Snapshot, Units, common_units, zero_bit_groups


@dataclass
class RunState:
    """What a run carries from step to step besides model and optimiser, and what a checkpoint keeps of it.

    ``snapshot``: every layer's bits at the last check that passed (None until compression starts);
    ``reference``: the reference model's per-example outcomes on the guard (None without a contract);
    ``passed``: the last state that passed (``step``, ``model`` and ``optimizer`` state dicts, the
    ``check``; ``optimizer`` is None for the reference itself); ``pace``: the slowed layers' factor on
    each step's change of their bits; ``preservation`` and ``guard``: indices into the training data;
    ``failing``: the checks that failed in a row until now; ``history``: every record.
    """

    step: int = 0
    snapshot: Snapshot | None = None
    reference: Outcomes | None = None
    passed: dict | None = None
    pace: dict[str, float] = field(default_factory=dict)
    failing: int = 0
    preservation: list[int] | None = None
    guard: list[int] | None = None
    history: list[dict] = field(default_factory=list)

    def to_record(self) -> dict:
        """Plain containers and tensors only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {"step": self.step, "snapshot": self.snapshot,
                "reference": None if self.reference is None else self.reference.to_record(),
                "passed": self.passed, "pace": self.pace, "failing": self.failing, "preservation": self.preservation,
                "guard": self.guard, "history": self.history}

    @classmethod
    def from_record(cls, record: dict) -> RunState:
        reference = record.get("reference")
        return cls(step=record["step"], snapshot=record["snapshot"],
                   reference=None if reference is None else Outcomes.from_record(reference),
                   passed=record.get("passed"), pace=record.get("pace") or {}, failing=record.get("failing", 0),
                   preservation=record.get("preservation"), guard=record.get("guard"), history=record["history"])


@dataclass(frozen=True)
class Policy:
    """What a safety check does. ``max_drop`` None: no contract (checks only prune). ``restore``: roll
    back once ``patience`` checks in a row failed. ``prune`` with ``pruner`` (None: keep zero-bit
    groups masked). ``look_order``: the guard's examples in the order a check looks at them (its two
    looks, :func:`~sgsc.train.guard.compare_in_looks`; None: the whole guard at once)."""

    max_drop: float | None
    confidence: float = 0.95
    patience: int = 1
    restore: bool = True
    prune: bool = True
    higher_is_better: bool = True
    pruner: Pruner | None = None
    look_order: torch.Tensor | None = None


@dataclass
class Decision:
    """A check's outcome: the guard ``check`` (None without a guard); the units to ``prune`` (or
    ``masked``: layer -> zero-bit groups, with no pruner); ``keep``: the state becomes the last that
    passed; ``wait``: no pruning and no new passing state (an uncertain or failed check); on a fail,
    the layers to ``slow`` and, at the ``patience``-th in a row, ``rollback``."""

    check: Check | None = None
    prune: Units = field(default_factory=dict)
    masked: dict[str, list[int]] | None = None
    keep: bool = False
    wait: bool = False
    rollback: bool = False
    slow: list[str] = field(default_factory=list)


def bits_snapshot(model: nn.Module) -> Snapshot:
    """Every quantized layer's bits, detached on the CPU."""
    return {name: layer.bits.detach().float().cpu().clone() for name, layer in quantized_layers(model)}


def lowered_layers(model: nn.Module, snapshot: Snapshot) -> list[str]:
    """Layers with a group whose storage width (``ceil(b)``, 0 when pruned) fell since ``snapshot``."""
    return [name for name, layer in quantized_layers(model)
            if name in snapshot and snapshot[name].shape == layer.bits.shape
            and bool((storage_bits(layer.bits.detach().cpu()) < storage_bits(snapshot[name])).any())]


# ---- the decision (rank 0) ---------------------------------------------------------------------------


Measure = Callable[[torch.Tensor | None], Outcomes]  # the current model's outcomes on these guard examples (None: all)


def judge(model: nn.Module, state: RunState, policy: Policy, measure: Measure | None) -> Decision:
    """A check's decision. ``measure`` scores the current model on the guard (None without a guard).

    Without ``restore`` the guard is only reported, and the check prunes as unsafe self-compression does.
    """
    if policy.max_drop is None or measure is None:
        return _prune_decision(model, state, policy, Decision())
    check = compare_in_looks(state.reference, measure, policy.look_order, higher_is_better=policy.higher_is_better,
                             max_drop=policy.max_drop, confidence=policy.confidence)
    if not policy.restore:
        return _prune_decision(model, state, policy, Decision(check))
    if check.verdict == "pass":
        return _prune_decision(model, state, policy, Decision(check, keep=True))
    if check.verdict == "fail" and state.failing + 1 >= policy.patience:
        return Decision(check, wait=True, rollback=True, slow=culprits(model, state, policy, measure))
    return Decision(check, wait=True)


def _ranking_examples(policy: Policy) -> torch.Tensor | None:
    """The guard examples the culprit search scores: the checks' first look, or all (None) for a small guard
    or a custom metric."""
    order = policy.look_order
    first = None if order is None else first_look(len(order))
    return None if first is None else order[:first]


def _prune_decision(model: nn.Module, state: RunState, policy: Policy, decision: Decision) -> Decision:
    if not policy.prune:
        return decision
    if policy.pruner is None:
        decision.masked = zero_bit_groups(model)
        return decision
    dead = policy.pruner.dead_units
    decision.prune = common_units(dead(model), dead(model, state.snapshot))
    return decision


@torch.no_grad()
def culprits(model: nn.Module, state: RunState, policy: Policy, measure: Measure) -> list[str]:
    """The layers whose compression since the last passing state did the harm.

    Each layer whose storage width fell gets its passing-state bits back alone (everything else as
    it is now) and the guard is scored; the layers whose restoring recovered at least half of the
    best single recovery are the culprits. When no layer alone recovers anything, every lowered layer is.
    The scoring uses the checks' first look (a fixed random quarter of a large guard): this ranks
    layers and decides nothing about the contract, and scoring the whole guard once per layer cost
    ResNet-20 about 140 CPU s per rollback (22 layers, 5,400 examples).
    """
    examples = _ranking_examples(policy)
    reference = state.reference if examples is None else subset(state.reference, examples)

    def drop() -> float:
        return compare(reference, measure(examples), higher_is_better=policy.higher_is_better,
                       max_drop=policy.max_drop, confidence=policy.confidence).drop

    layers = dict(quantized_layers(model))
    failed, recovered = drop(), {}
    for name in lowered_layers(model, state.snapshot):
        bits = layers[name].bits
        now = bits.detach().clone()
        bits.copy_(state.snapshot[name].to(bits.device))
        try:
            recovered[name] = failed - drop()
        finally:
            bits.copy_(now)
    best = max(recovered.values(), default=0.0)
    if best <= 0:
        return sorted(recovered)
    return sorted(name for name, value in recovered.items() if value >= best / 2)


# ---- carrying it out (every rank) -------------------------------------------------------------------


def carry_out(model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState, decision: Decision, *,
              pruner: Pruner | None) -> dict:
    """Carry out :func:`judge`'s decision on this rank; returns the event to log."""
    event = {"kind": "check", "step": state.step}
    if decision.check is not None:
        event.update(guard=decision.check.to_record(), verdict=decision.check.verdict)
    if decision.check is not None:
        state.failing = state.failing + 1 if decision.check.verdict == "fail" else 0
    if decision.rollback:
        state.failing = 0
        event["rolled_back_to"] = roll_back(model, optimizer, state)
    if decision.slow:
        for name in decision.slow:
            state.pace[name] = state.pace.get(name, 1.0) / 2
        event["slowed"] = {name: state.pace[name] for name in decision.slow}
    if decision.wait:
        return event
    if decision.masked is not None:
        event["masked"] = decision.masked
    elif pruner is not None:
        event["pruned"] = pruner.prune(model, optimizer, decision.prune) if decision.prune else {}
        kept = {unit: sorted(set(idx) - set(event["pruned"].get(unit, ()))) for unit, idx in decision.prune.items()}
        if any(kept.values()):  # e.g. coupled to a live channel: sgsc.nn.graph_pruning's report says why
            event["kept"] = {unit: idx for unit, idx in kept.items() if idx}
    state.snapshot = bits_snapshot(model)
    if decision.keep:
        keep_passed(model, optimizer, state, decision.check)
    return event


def keep_passed(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: RunState,
                check: Check | None) -> None:
    """Keep the current state as the last that passed (after any pruning, so shapes match a rollback)."""
    state.failing = 0
    state.passed = {"step": state.step, "model": _cpu_copy(model.state_dict()),
                    "optimizer": None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
                    "check": None if check is None else check.to_record()}


def _cpu_copy(tensors: dict) -> dict:
    return {key: value.detach().to("cpu", copy=True) for key, value in tensors.items()}


@torch.no_grad()
def roll_back(model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> int:
    """Put back the last state that passed; returns its step. The reference itself has no optimiser
    state: rolling back to it restarts Adam's moments."""
    passed = state.passed
    model.load_state_dict(passed["model"])
    if passed["optimizer"] is None:
        optimizer.state.clear()
    else:
        optimizer.load_state_dict(passed["optimizer"])
    state.snapshot = bits_snapshot(model)
    return passed["step"]


class Pace:
    """Scales each step's change of a slowed layer's bits by its pace (the optimiser moved them; this
    takes back the rest), which is a per-layer learning rate for bits that Adam's scale-free steps
    cannot be given through the gradient. :meth:`mark` records the bits the next step starts from."""

    def __init__(self, model: nn.Module, state: RunState) -> None:
        self.model, self.state, self.start = model, state, {}
        self.mark()

    @torch.no_grad()
    def mark(self) -> None:
        layers = dict(quantized_layers(self.model))
        self.start = {name: layers[name].bits.detach().clone() for name in self.state.pace}

    @torch.no_grad()
    def apply(self) -> None:
        layers = dict(quantized_layers(self.model))
        for name, pace in self.state.pace.items():
            bits, start = layers[name].bits, self.start.get(name)
            if start is not None and start.shape == bits.shape:
                bits.copy_(start + pace * (bits - start))
        self.mark()
