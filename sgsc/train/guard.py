"""The guard check: is the compressed model still within ``max_drop`` of the reference, with confidence?

The guard set is data no batch and no loss term ever sees (``guard=`` given, or a split
:func:`sgsc.compress` holds out of the training data). The *reference* is the model as compression
started; its per-example outcomes on the guard are recorded once. Each check scores the current
model on the same examples and compares the two **paired**, example by example, so the noise of
the guard's sampling (which examples it happens to hold) cancels and only the examples whose
outcome changed count:

* per example ``i``: ``v_i``, the sum of its scored outcomes (correct positions for accuracy, the
  summed task loss for loss) and ``w_i`` its scored positions (1 for an image, the tokens of a
  sequence; 1 per example for a custom loss);
* the metric is ``sum(v) / sum(w)``; the paired difference ``D = sum(v_now - v_ref) / W`` and its
  standard error from the per-example differences (the ratio estimator's: McNemar's statistic for
  plain accuracy);
* ``drop`` is how much worse the model got (``-D`` for accuracy, ``D`` for loss), with the one-sided
  bounds ``drop -/+ z * se`` at ``confidence``.

A state **passes** when its upper bound is at most ``max_drop`` (the contract holds at that
confidence), **fails** when its lower bound exceeds ``max_drop`` (harm beyond doubt), and is
**uncertain** otherwise: noise neither triggers a rollback nor lets a state through. A custom metric
callable gives one number, not per-example outcomes: it is compared as a point estimate.

**Two looks.** Scoring the whole guard at every check cost as much as the training steps between
checks. A check during the run therefore looks first at a quarter of the guard (its examples in a
fixed random order, so the quarter is a random sample; a guard under ``4 * MIN_FIRST_LOOK`` examples
is scored whole), and stops there when that quarter already
passes; otherwise it scores the rest and decides on the whole guard. The error of passing a state
whose true drop exceeds ``max_drop`` is split between the looks (Bonferroni: ``EARLY_SHARE`` of
``1 - confidence`` to the first, the rest to the second), so it stays within ``1 - confidence``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sgsc.train.data import IGNORE_INDEX
from sgsc.train.task import EVAL_BATCH, model_device

VERDICTS = ("pass", "uncertain", "fail")
# The share of the check's error spent on its first look, and the smallest first look worth taking.
EARLY_SHARE = 0.2
MIN_FIRST_LOOK = 250


@dataclass(frozen=True)
class Outcomes:
    """Per-example outcome sums ``values`` and scored positions ``weights`` (float64, CPU)."""

    values: torch.Tensor
    weights: torch.Tensor

    @property
    def metric(self) -> float:
        return float(self.values.sum() / self.weights.sum().clamp(min=1))

    def to_record(self) -> dict:
        return {"values": self.values, "weights": self.weights}

    @classmethod
    def from_record(cls, record: dict) -> Outcomes:
        return cls(record["values"], record["weights"])


@dataclass(frozen=True)
class Check:
    """One comparison with the reference: the metric now and then, how much worse (``drop``, in the
    metric's units), its one-sided bounds, the guard's size and the verdict."""

    value: float
    reference: float
    drop: float
    low: float
    high: float
    n: int
    verdict: str

    def to_record(self) -> dict:
        return {"value": self.value, "reference": self.reference, "drop": self.drop, "bound": self.high,
                "n": self.n, "verdict": self.verdict}


def _ratio_error(values: torch.Tensor, weights: torch.Tensor, mean: float) -> float:
    """The standard error of ``sum(values) / sum(weights)`` (the ratio estimator's, over the examples)."""
    n = len(values)
    if n < 2:
        return 0.0
    spread = values - mean * weights
    return math.sqrt(n / (n - 1) * float(spread.square().sum())) / float(weights.sum())


def standard_error(outcomes: Outcomes) -> float:
    """The standard error of ``outcomes.metric`` from its examples alone (unpaired): how far a set of
    this size may be from the population's value."""
    return _ratio_error(outcomes.values, outcomes.weights, outcomes.metric)


def z_score(confidence: float) -> float:
    """The one-sided normal quantile of ``confidence`` (1.645 at 0.95)."""
    return NormalDist().inv_cdf(confidence)


def compare(reference: Outcomes, now: Outcomes, *, higher_is_better: bool, max_drop: float,
            confidence: float) -> Check:
    """The paired comparison of ``now`` with ``reference`` (same examples, same order) and its verdict."""
    weight = float(reference.weights.sum())
    if weight <= 0:
        raise ValueError("the guard set has no scored examples (every target is padding)")
    differences = now.values - reference.values
    change = float(differences.sum()) / weight
    n = len(differences)
    se = _ratio_error(differences, reference.weights, change)  # 0 for one number: a point comparison
    drop = -change if higher_is_better else change
    z = z_score(confidence)
    low, high = drop - z * se, drop + z * se
    if not math.isfinite(drop + se):  # a model that outputs NaN or Inf has failed, not become uncertain
        verdict = "fail"
    else:
        verdict = "pass" if high <= max_drop else ("fail" if low > max_drop else "uncertain")
    return Check(now.metric, reference.metric, drop, low, high, n, verdict)


def first_look(n: int) -> int | None:
    """How many guard examples a check scores first (a quarter), or None to score all at once."""
    quarter = math.ceil(n / 4)
    return quarter if quarter >= MIN_FIRST_LOOK else None


def subset(outcomes: Outcomes, examples: torch.Tensor) -> Outcomes:
    """The outcomes of the guard examples at indices ``examples``."""
    return Outcomes(outcomes.values[examples], outcomes.weights[examples])


def compare_in_looks(reference: Outcomes, measure: Callable[[torch.Tensor | None], Outcomes],
                     order: torch.Tensor | None, *, higher_is_better: bool, max_drop: float,
                     confidence: float) -> Check:
    """:func:`compare` in two looks (the module docstring). ``measure(examples)`` scores the guard
    examples at those indices (all of them for None); ``order`` is the guard's examples in a fixed
    random order, whose first quarter is the first look (None: the whole guard at once). Returns the
    first look's check when it passes, else the whole guard's."""
    first = None if order is None else first_look(len(order))
    if first is None:
        return compare(reference, measure(None), higher_is_better=higher_is_better, max_drop=max_drop,
                       confidence=confidence)
    error, examples = 1 - confidence, order[:first]
    early = compare(subset(reference, examples), measure(examples), higher_is_better=higher_is_better,
                    max_drop=max_drop, confidence=1 - EARLY_SHARE * error)
    if early.verdict == "pass":
        return early
    return compare(reference, measure(None), higher_is_better=higher_is_better, max_drop=max_drop,
                   confidence=1 - (1 - EARLY_SHARE) * error)


def warn_if_unresolvable(reference: Outcomes, *, metric: str, max_drop: float, confidence: float) -> None:
    """Warn when the guard is too small for its check to tell a drop of ``max_drop`` from noise.

    Accuracy: a drop of ``max_drop`` made of flips one way has a standard error of
    ``sqrt(max_drop / n)``; below ``4 z^2 / max_drop`` examples its bound is more than half of
    ``max_drop`` wide, so few compressed states can pass. Loss: the reference's per-example spread
    stands in for that of the paired differences.
    """
    n, z = len(reference.values), z_score(confidence)
    if max_drop <= 0:
        return
    if metric == "accuracy":
        needed = math.ceil(4 * z * z / max_drop)
    else:
        per_example = reference.values / reference.weights.clamp(min=1)
        needed = math.ceil((2 * z * float(per_example.std()) / max_drop) ** 2) if n > 1 else 1
    if n < needed:
        warnings.warn(f"sgsc: the guard set has {n} examples; resolving max_drop={max_drop:g} at confidence "
                      f"{confidence:g} takes about {needed}, so the check will let few compressed states pass "
                      "(give a larger guard=, or a larger guard_fraction or max_drop)", stacklevel=4)


# ---- per-example outcomes ------------------------------------------------------------------------


PerExample = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _classes(logits: torch.Tensor, targets: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct positions (``metric="accuracy"``) or summed cross-entropy, and scored positions, per example."""
    batch = len(targets)
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    valid = (flat_targets != IGNORE_INDEX).view(batch, -1)
    if metric == "accuracy":
        hits = (flat_logits.argmax(-1) == flat_targets).view(batch, -1) & valid
        values = hits.sum(1)
    else:
        losses = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
        values = losses.view(batch, -1).sum(1)
    return values.double(), valid.sum(1).double()


def _one_by_one(task_loss: Callable) -> PerExample:
    """A custom loss gives a mean over what it scores: each example is scored alone, with weight 1."""

    def per_example(logits, targets):
        values = torch.stack([task_loss(logits[i : i + 1], targets[i : i + 1]).detach().float()
                              for i in range(len(targets))])
        return values.double(), torch.ones(len(targets), dtype=torch.float64)

    return per_example


def per_example(metric: str, task_loss: Callable | None) -> PerExample:
    """The per-example outcome of ``metric`` (``"accuracy"`` or ``"loss"``) under ``task_loss`` (None:
    cross-entropy over the last dimension, padding unscored)."""
    if metric == "loss" and task_loss is not None:
        return _one_by_one(task_loss)
    return lambda logits, targets: _classes(logits, targets, metric)


@torch.no_grad()
def outcomes(model: nn.Module, data: TensorDataset, score: PerExample, batch_size: int = EVAL_BATCH,
             examples: torch.Tensor | None = None) -> Outcomes:
    """``score`` of ``model`` on every example of ``data`` (those at indices ``examples``), in eval mode
    (the mode is put back)."""
    inputs, targets = data.tensors if examples is None else (t[examples] for t in data.tensors)
    device = model_device(model)
    was_training = model.training
    model.eval()
    values, weights = [], []
    try:
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            v, w = score(model(x), targets[start : start + batch_size].to(device))
            values.append(v.cpu())
            weights.append(w.cpu())
    finally:
        model.train(was_training)
    return Outcomes(torch.cat(values), torch.cat(weights))


def point(value: float) -> Outcomes:
    """A custom metric's one number as outcomes (a point comparison)."""
    return Outcomes(torch.tensor([float(value)], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
