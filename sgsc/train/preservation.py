"""The preservation set: the training examples a compressed model must keep getting right.

Three criteria each rank every training example, and the set is their de-duplicated union, with
each criterion filling its share of the places:

* **Grad-CAM importance** (``gradcam``). For a 4-D attribution layer (feature maps ``A``,
  ``(B, C, H, W)``) it is Grad-CAM: channel weights ``alpha_c = mean_hw d y_target / d A_c`` and the
  map ``relu(sum_c alpha_c A_c)``; an example's score is the map's *mass* (its sum over positions),
  the total positive class evidence the last conv layer holds for the true label. For any other
  rank (token embeddings ``(B, T, D)`` of a decoder) it is gradient x activation: per position
  ``relu(<d y / d A_t, A_t>)``, summed over positions. ``y_target`` is the logit of the true label
  (summed over the scored positions of a sequence), so the score measures how much the features an
  example relies on matter for getting it right.
* **Uncertainty** (``uncertainty``): ``1 - (p_top1 - p_top2)`` of the softmax (``"margin"``) or its
  entropy (``"entropy"``), averaged over scored positions; examples near the decision boundary are
  the first to flip when weights are compressed.
* **Diversity** (``diversity``): k-means (scikit-learn, seeded) on the penultimate embeddings
  (what the model's head reads, averaged over a sequence's scored positions), with as many clusters
  as the criterion has places; it takes the example nearest each centroid, then the second nearest, etc.

Any classifier or sequence model works: :func:`find_layers` finds the two layers from one forward
pass (the attribution layer: the last 4-D feature map that reaches the logits, or for token inputs
the embedding that reads them; the head: the last ``nn.Linear`` to run, which must produce the
logits). The ``attribution_layer`` and ``embedding_layer`` arguments override either, and a model may
name its attribution layer itself (``model.attribution_layer``, as the zoo's models do). A model
where a criterion finds no layer gets a ``ValueError`` naming the argument to pass.

Criteria fill their quotas in the order above, each skipping examples already taken, so the set
has exactly ``round(fraction * N)`` unique examples and every criterion contributes exactly its
share. Diversity goes last on purpose: a cluster already represented by an earlier pick yields its
place to the next cluster's nearest example. Everything is deterministic given ``seed``.

The ablation baseline, ``method="random"`` of :func:`build`, draws a uniform random subset of the
same size instead (:func:`random_subset`).

The criteria are scored in :mod:`sgsc.train.preservation_scores` and a set is written and read by
:mod:`sgsc.train.preservation_files`; this module chooses the set and gives every public name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from sgsc._deps import require
from sgsc.train.preservation_files import FORMAT, VERSION, load, save
from sgsc.train.preservation_scores import (
    CRITERIA,
    IGNORE_INDEX,
    UNCERTAINTY_MEASURES,
    Layers,
    Scores,
    _as_dataset,
    compute_scores,
    find_layers,
)

__all__ = [
    "CRITERIA",
    "FORMAT",
    "IGNORE_INDEX",
    "METHODS",
    "UNCERTAINTY_MEASURES",
    "VERSION",
    "Layers",
    "Scores",
    "Selection",
    "build",
    "check_fraction",
    "compute_scores",
    "diversity_ranking",
    "find_layers",
    "load",
    "normalize_weights",
    "quotas",
    "random_subset",
    "save",
    "select",
    "set_size",
]

METHODS = ("criteria", "random")  # how build chooses: the three criteria, or the random ablation

_KMEANS_DIMS = 32  # PCA width before k-means: distances in 3k-dim CNN features are slow and noisy
_MINIBATCH_WORK = 20_000_000  # examples x clusters above which MiniBatchKMeans replaces KMeans


@dataclass
class Selection:
    """A preservation set: sorted ``indices`` and which criterion chose each (disjoint parts)."""

    indices: torch.Tensor
    by_criterion: dict[str, torch.Tensor] = field(default_factory=dict)
    dataset_size: int = 0


# ---- argument checks ------------------------------------------------------------------------


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in ``(0, 1]``; ``ValueError`` otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def set_size(fraction: float, dataset_size: int) -> int:
    """``round(fraction * dataset_size)``, refusing an empty set."""
    size = int(round(check_fraction(fraction) * dataset_size))
    if size < 1:
        raise ValueError(f"fraction {fraction} of {dataset_size} examples selects nothing; raise fraction")
    return size


def normalize_weights(weights: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
    """Criterion shares as a dict summing to 1, from a 3-sequence in CRITERIA order or a mapping."""
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(CRITERIA))
        if unknown:
            raise ValueError(f"weights has unknown criteria {unknown}; known: {CRITERIA}")
        values = [weights.get(name, 0.0) for name in CRITERIA]
    else:
        values = list(weights)
        if len(values) != len(CRITERIA):
            raise ValueError(f"weights must give {len(CRITERIA)} shares {CRITERIA}, got {len(values)}")
    for name, value in zip(CRITERIA, values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"weights: the {name} share must be a finite number >= 0, got {value!r}")
    total = sum(values)
    if total <= 0:
        raise ValueError("weights must have at least one positive share")
    return {name: value / total for name, value in zip(CRITERIA, values)}


def quotas(size: int, weights: Sequence[float] | Mapping[str, float]) -> dict[str, int]:
    """Places per criterion summing to ``size`` (largest remainders; ties go to the earlier criterion)."""
    shares = normalize_weights(weights)
    exact = {name: shares[name] * size for name in CRITERIA}
    counts = {name: math.floor(exact[name]) for name in CRITERIA}
    by_remainder = sorted(CRITERIA, key=lambda name: (-(exact[name] - counts[name]), CRITERIA.index(name)))
    for name in by_remainder[: size - sum(counts.values())]:
        counts[name] += 1
    return counts


# ---- selection ------------------------------------------------------------------------------


def _ranking(scores: torch.Tensor) -> np.ndarray:
    """Indices by descending score; ties keep the lower index first, so the order is reproducible."""
    return np.argsort(-scores.numpy(), kind="stable")


def _reduce_dims(features: np.ndarray, seed: int) -> np.ndarray:
    if features.shape[1] <= _KMEANS_DIMS or features.shape[0] <= _KMEANS_DIMS:
        return features
    PCA = require("sklearn.decomposition", "train").PCA

    return PCA(n_components=_KMEANS_DIMS, random_state=seed).fit_transform(features)


def diversity_ranking(embeddings: torch.Tensor, n_clusters: int, seed: int) -> np.ndarray:
    """Examples in round-robin order over k-means clusters: every cluster's nearest, then 2nd, ...

    Within a round, clusters whose representative lies closer to its centroid come first.
    """
    cluster = require("sklearn.cluster", "train")
    KMeans, MiniBatchKMeans = cluster.KMeans, cluster.MiniBatchKMeans

    features = _reduce_dims(embeddings.numpy(), seed).astype(np.float64)
    n = features.shape[0]
    n_clusters = max(1, min(n_clusters, n))
    if n * n_clusters > _MINIBATCH_WORK:
        kmeans = MiniBatchKMeans(n_clusters=n_clusters, n_init=1, batch_size=4096, random_state=seed)
    else:
        kmeans = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
    labels = kmeans.fit_predict(features)
    distance = np.linalg.norm(features - kmeans.cluster_centers_[labels], axis=1)
    index = np.arange(n)
    by_cluster = np.lexsort((index, distance, labels))  # per cluster, nearest first
    round_of = np.empty(n, dtype=np.int64)
    starts = np.searchsorted(labels[by_cluster], labels[by_cluster], side="left")
    round_of[by_cluster] = np.arange(n) - starts
    return np.lexsort((index, distance, round_of))


def _fill(ranking: np.ndarray, quota: int, taken: np.ndarray) -> np.ndarray:
    fresh = ranking[~taken[ranking]][:quota]
    taken[fresh] = True
    return fresh


def select(
    scores: Scores,
    fraction: float,
    weights: Sequence[float] | Mapping[str, float] = (1, 1, 1),
    *,
    seed: int = 0,
) -> Selection:
    """Combine computed :class:`Scores` into a preservation set of ``round(fraction * N)`` examples."""
    present = [t for t in (scores.gradcam, scores.uncertainty, scores.embeddings) if t is not None]
    if not present:
        raise ValueError("scores holds no criterion values")
    n = present[0].shape[0]
    if any(t.shape[0] != n for t in present):
        raise ValueError("scores cover different numbers of examples")
    places = quotas(set_size(fraction, n), weights)
    sources = {"gradcam": scores.gradcam, "uncertainty": scores.uncertainty, "diversity": scores.embeddings}
    taken = np.zeros(n, dtype=bool)
    chosen: dict[str, torch.Tensor] = {}
    for name in CRITERIA:
        if places[name] == 0:
            continue
        if sources[name] is None:
            raise ValueError(f"weights give {name} {places[name]} places but its scores were not computed")
        if name == "diversity":
            ranking = diversity_ranking(sources[name], places[name], seed)
        else:
            ranking = _ranking(sources[name])
        chosen[name] = torch.from_numpy(np.sort(_fill(ranking, places[name], taken)))
    indices = torch.from_numpy(np.flatnonzero(taken))
    return Selection(indices=indices, by_criterion=chosen, dataset_size=n)


def build(
    model: nn.Module,
    dataset: Dataset | Sequence[torch.Tensor],
    fraction: float = 0.1,
    weights: Sequence[float] | Mapping[str, float] = (1, 1, 1),
    *,
    method: str = "criteria",
    seed: int = 0,
    batch_size: int = 256,
    uncertainty: str = "margin",
    attribution_layer: nn.Module | None = None,
    embedding_layer: nn.Module | None = None,
    task_loss=None,
    pool: int | None = None,
) -> torch.Tensor:
    """Sorted int64 indices of the ``round(fraction * len(dataset))`` examples to preserve.

    ``method="criteria"`` scores the examples: ``weights`` are the shares of (gradcam, uncertainty,
    diversity), as a 3-sequence or a mapping; they need not sum to 1 and a zero share skips that
    criterion's computation entirely. See the module docstring for each criterion, and
    :func:`compute_scores` for ``attribution_layer``, ``embedding_layer`` and ``task_loss`` (for
    outputs that are not class scores: the criteria then come from each example's task loss).
    ``method="random"`` is the ablation baseline: :func:`random_subset` of the same size, drawn with
    ``seed``; ``model`` and ``weights`` play no part. ``pool`` (criteria only) scores a random pool of
    that many examples (drawn with ``seed``; at least the set's size) instead of all of them: the
    scoring and the k-means cost grow with the examples scored, the set's size does not change.
    ``ValueError`` for an unknown ``method``, ``fraction`` outside ``(0, 1]`` or a fraction so small
    that it selects nothing.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "random":
        n = len(_as_dataset(dataset))
        return random_subset(n, set_size(fraction, n), seed=seed)
    check_fraction(fraction)
    shares = normalize_weights(weights)
    dataset = _as_dataset(dataset)
    n = len(dataset)
    candidates = None if pool is None or pool >= n else random_subset(n, max(pool, set_size(fraction, n)), seed=seed)
    scores = compute_scores(
        model, dataset if candidates is None else Subset(dataset, candidates.tolist()),
        criteria=[name for name in CRITERIA if shares[name] > 0], batch_size=batch_size, uncertainty=uncertainty,
        attribution_layer=attribution_layer, embedding_layer=embedding_layer, task_loss=task_loss,
    )
    if candidates is None:
        return select(scores, fraction, weights, seed=seed).indices
    chosen = select(scores, set_size(fraction, n) / len(candidates), weights, seed=seed).indices
    return candidates[chosen].sort().values


def random_subset(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """The ablation baseline: ``size`` distinct indices of ``range(n)``, uniformly at random, sorted."""
    for name, value in (("n", n), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= size <= n:
        raise ValueError(f"size must be in [1, n={n}], got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values
