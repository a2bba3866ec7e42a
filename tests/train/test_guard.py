"""The guard check: per-example outcomes, the paired bound against McNemar's hand formula, the three
verdicts, a model that outputs NaN failing, and the warning for a guard too small for max_drop."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sgsc.train.guard import Outcomes, compare, outcomes, per_example, point, warn_if_unresolvable


def _accuracy_pair(n: int, lost: int, gained: int) -> tuple[Outcomes, Outcomes]:
    """Reference right on the first ``lost`` examples that the model now gets wrong, and wrong on the
    next ``gained`` that it now gets right; both right on every other example."""
    ref = torch.ones(n, dtype=torch.float64)
    now = torch.ones(n, dtype=torch.float64)
    now[:lost] = 0
    ref[lost : lost + gained] = 0
    ones = torch.ones(n, dtype=torch.float64)
    return Outcomes(ref, ones), Outcomes(now, ones)


@pytest.mark.parametrize(("lost", "gained"), [(30, 10), (10, 30), (0, 0), (5, 0)])
def test_the_paired_bound_is_mcnemars(lost, gained):
    n, confidence = 1000, 0.95
    ref, now = _accuracy_pair(n, lost, gained)
    check = compare(ref, now, higher_is_better=True, max_drop=0.01, confidence=confidence)
    drop = (lost - gained) / n
    # McNemar's paired difference of proportions: var = ((b + c) / n - drop^2) / (n - 1)
    se = math.sqrt(((lost + gained) / n - drop**2) / (n - 1))
    z = NormalDist().inv_cdf(confidence)
    assert check.drop == pytest.approx(drop)
    assert check.high == pytest.approx(drop + z * se) and check.low == pytest.approx(drop - z * se)
    assert check.value == pytest.approx(now.metric) and check.reference == pytest.approx(ref.metric)
    assert check.n == n


@pytest.mark.parametrize(("lost", "gained", "verdict"), [
    (0, 0, "pass"),       # nothing changed
    (12, 10, "pass"),     # drop 0.2 points, bound ~1.0
    (60, 30, "uncertain"),  # drop 3 points, bound from ~1.4 to ~4.6 around max_drop 2
    (100, 10, "fail"),    # drop 9 points beyond doubt
])
def test_the_verdict_follows_the_bounds(lost, gained, verdict):
    ref, now = _accuracy_pair(1000, lost, gained)
    check = compare(ref, now, higher_is_better=True, max_drop=0.02, confidence=0.95)
    assert check.verdict == verdict
    assert (check.verdict == "pass") == (check.high <= 0.02)
    assert (check.verdict == "fail") == (check.low > 0.02)


def test_a_loss_is_worse_when_higher_and_sequences_weigh_by_their_tokens():
    # two sequences of 3 and 1 scored tokens: the metric is per token, the pairing per sequence
    ref = Outcomes(torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64))
    now = Outcomes(torch.tensor([3.6, 1.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64))
    check = compare(ref, now, higher_is_better=False, max_drop=1.0, confidence=0.95)
    assert check.value == pytest.approx(4.6 / 4) and check.reference == pytest.approx(1.0)
    assert check.drop == pytest.approx(0.6 / 4)


def test_non_finite_outcomes_fail():
    ref = Outcomes(torch.ones(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    now = Outcomes(torch.full((10,), math.nan, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    assert compare(ref, now, higher_is_better=False, max_drop=10.0, confidence=0.95).verdict == "fail"


def test_a_custom_metric_is_a_point_comparison():
    check = compare(point(0.90), point(0.885), higher_is_better=True, max_drop=0.01, confidence=0.95)
    assert check.drop == pytest.approx(0.015) and check.low == check.high == check.drop
    assert check.verdict == "fail"


class _Fixed(nn.Module):
    """Logits that put class 0 first for even inputs and class 1 for odd ones."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        odd = (x.round().long() % 2).float()
        return torch.stack([1 - odd, odd], -1) * 4


def test_outcomes_score_each_example_and_skip_padding():
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    y = torch.tensor([[0, 0, -1], [1, 1, 1]])  # the first sequence has a padded position
    got = outcomes(_Fixed(), TensorDataset(x, y), per_example("accuracy", None))
    assert got.values.tolist() == [1.0, 2.0] and got.weights.tolist() == [2.0, 3.0]
    loss = outcomes(_Fixed(), TensorDataset(x, y), per_example("loss", None))
    per_token = torch.nn.functional.cross_entropy(torch.tensor([[4.0, 0.0]]), torch.tensor([1]))  # a wrong one
    right = torch.nn.functional.cross_entropy(torch.tensor([[4.0, 0.0]]), torch.tensor([0]))
    assert loss.values.tolist() == pytest.approx([float(right + per_token), float(right + per_token + right)])
    custom = outcomes(_Fixed(), TensorDataset(x, y), per_example("loss", lambda out, t: out.sum() * 0 + t.sum()))
    assert custom.values.tolist() == [-1.0, 3.0] and custom.weights.tolist() == [1.0, 1.0]


def test_a_guard_too_small_for_max_drop_is_warned_about():
    small = Outcomes(torch.ones(100, dtype=torch.float64), torch.ones(100, dtype=torch.float64))
    with pytest.warns(UserWarning, match="the guard set has 100 examples; resolving max_drop=0.01 .* takes about 1083"):
        warn_if_unresolvable(small, metric="accuracy", max_drop=0.01, confidence=0.95)
    large = Outcomes(torch.ones(2000, dtype=torch.float64), torch.ones(2000, dtype=torch.float64))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unresolvable(large, metric="accuracy", max_drop=0.01, confidence=0.95)
