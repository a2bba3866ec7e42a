"""The guard check: per-example outcomes, the paired bound against McNemar's hand formula, the three
verdicts, a model that outputs NaN failing, and the warning for a guard too small for max_drop."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sgsc.nn import QLinear, quantized_layers
from sgsc.train.guard import (
    MIN_FIRST_LOOK,
    Outcomes,
    compare,
    compare_in_looks,
    outcomes,
    per_example,
    point,
    subset,
    warn_if_unresolvable,
)
from sgsc.train.safety import Policy, RunState, bits_snapshot, culprits


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


# ---- two looks --------------------------------------------------------------------------------


def _flips(n: int, lost: int, gained: int, generator: torch.Generator) -> tuple[Outcomes, Outcomes]:
    """A reference right on every example and a model that lost ``lost`` of them and gained ``gained``
    back on others it had lost (both at random places)."""
    reference = torch.ones(n, dtype=torch.float64)
    reference[torch.randperm(n, generator=generator)[:gained]] = 0
    now = reference.clone()
    places = torch.randperm(n, generator=generator)
    now[places[reference[places] == 1][:lost]] = 0
    now[reference == 0] = 1
    weights = torch.ones(n, dtype=torch.float64)
    return Outcomes(reference, weights), Outcomes(now, weights)


def _looks(reference: Outcomes, now: Outcomes, order, max_drop=0.01, confidence=0.95):
    seen = []

    def measure(examples):
        seen.append(None if examples is None else len(examples))
        return now if examples is None else subset(now, examples)

    check = compare_in_looks(reference, measure, order, higher_is_better=True, max_drop=max_drop, confidence=confidence)
    return check, seen


def test_a_clear_pass_stops_at_the_first_quarter_and_a_close_one_scores_the_whole_guard():
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(4000, generator=generator)
    reference, better = _flips(4000, lost=20, gained=60, generator=generator)  # 1 point better
    check, seen = _looks(reference, better, order)
    assert seen == [1000] and check.verdict == "pass" and check.n == 1000
    reference, close = _flips(4000, lost=100, gained=60, generator=generator)  # 1 point worse
    check, seen = _looks(reference, close, order)
    assert seen == [1000, None] and check.n == 4000
    # the whole guard's bound is taken at the error the first look left: 1 - 0.8 * 0.05
    expected = compare(reference, close, higher_is_better=True, max_drop=0.01, confidence=1 - 0.8 * 0.05)
    assert (check.high, check.verdict) == (pytest.approx(expected.high), expected.verdict)


def test_a_small_guard_or_no_order_is_scored_whole_at_the_stated_confidence():
    generator = torch.Generator().manual_seed(1)
    reference, now = _flips(900, lost=5, gained=9, generator=generator)
    assert 900 / 4 < MIN_FIRST_LOOK
    for order in (torch.randperm(900, generator=generator), None):
        check, seen = _looks(reference, now, order)
        assert seen == [None]
        assert check == compare(reference, now, higher_is_better=True, max_drop=0.01, confidence=0.95)


def test_two_looks_pass_a_state_at_the_limit_no_more_often_than_the_confidence_allows():
    # true drop exactly max_drop: passing it is the error the contract bounds (5% at 0.95)
    generator = torch.Generator().manual_seed(2)
    trials, n, passed = 1500, 2000, 0
    for _ in range(trials):
        flips = torch.rand(n, generator=generator)
        reference = torch.ones(n, dtype=torch.float64)
        now = reference.clone()
        now[flips < 0.03] = 0          # 3% lost
        reference[flips > 0.98] = 0    # 2% the reference missed and the model gets right: net 1 point worse
        weights = torch.ones(n, dtype=torch.float64)
        check, _ = _looks(Outcomes(reference, weights), Outcomes(now, weights), torch.randperm(n, generator=generator))
        passed += check.verdict == "pass"
    rate = passed / trials
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials), rate


def test_the_culprit_search_ranks_layers_on_the_first_look_only():
    # Two quantized layers; outcomes on the guard depend on their storage widths: "harm" at 1 bit costs 60% of
    # the examples, "mild" one bit lower costs nothing. The search scores only the first quarter of the guard.
    model = nn.Sequential(QLinear(4, 4), QLinear(4, 4))
    names = [name for name, _ in quantized_layers(model)]
    state = RunState(reference=Outcomes(torch.ones(2000, dtype=torch.float64), torch.ones(2000, dtype=torch.float64)),
                     snapshot=bits_snapshot(model))
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(0))
    seen = []

    def measure(examples):
        seen.append(None if examples is None else examples.tolist())
        n = 2000 if examples is None else len(examples)
        harmed = bool((model[0].bits <= 1).all())
        values = torch.ones(n, dtype=torch.float64)
        values[: int(0.6 * n)] = 0.0 if harmed else 1.0
        return Outcomes(values, torch.ones(n, dtype=torch.float64))

    with torch.no_grad():
        model[0].bits.fill_(1.0)
        model[1].bits -= 1.0
    policy = Policy(max_drop=0.01, look_order=order)
    assert culprits(model, state, policy, measure) == [names[0]]
    assert seen == [order[:500].tolist()] * 3  # the failed state, then each lowered layer restored alone
    seen.clear()
    assert culprits(model, state, Policy(max_drop=0.01), measure) == [names[0]] and seen == [None] * 3
