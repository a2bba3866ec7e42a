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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sgsc._deps import require
from sgsc._io import atomic_write
from sgsc.train.task import model_device

CRITERIA = ("gradcam", "uncertainty", "diversity")
METHODS = ("criteria", "random")  # how build chooses: the three criteria, or the random ablation
UNCERTAINTY_MEASURES = ("margin", "entropy")
IGNORE_INDEX = -1  # sequence targets below 0 are padding (sgsc.train.data.IGNORE_INDEX)
FORMAT = "sgsc.preservation"
VERSION = 1

_KMEANS_DIMS = 32  # PCA width before k-means: distances in 3k-dim CNN features are slow and noisy
_MINIBATCH_WORK = 20_000_000  # examples x clusters above which MiniBatchKMeans replaces KMeans


@dataclass
class Scores:
    """Per-example criterion values (higher = more worth preserving); ``None`` when not computed."""

    gradcam: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None


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


# ---- scoring --------------------------------------------------------------------------------


def _as_dataset(dataset: Dataset | Sequence[torch.Tensor]) -> Dataset:
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(isinstance(t, torch.Tensor) for t in dataset):
        return TensorDataset(*dataset)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            "dataset must be a torch Dataset of (input, target) pairs or an (inputs, targets) pair, "
            f"got {type(dataset).__name__}"
        )
    return dataset


_PROBE_EXAMPLES = 8  # inputs of the pass that finds the layers


@dataclass
class Layers:
    """What the criteria read: Grad-CAM the output of ``attribution``, diversity the input of ``embedding``."""

    attribution: nn.Module | None = None
    embedding: nn.Module | None = None


def _is_feature_map(output) -> bool:
    # a 1x1 map (global pooling, a squeeze-excitation gate) has no spatial evidence to weigh
    return (isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() == 4
            and output.shape[2] * output.shape[3] > 1)


def _reads_input(module: nn.Module, inputs: tuple, x: torch.Tensor) -> bool:
    """An ``nn.Embedding`` looking up the model's input ids (not positions, which only share the shape)."""
    if not isinstance(module, nn.Embedding) or not inputs or not isinstance(inputs[0], torch.Tensor):
        return False
    ids = inputs[0]
    return ids is x or (ids.shape == x.shape and torch.equal(ids, x))


class _Probe:
    """Forward hooks on every submodule that record, in the order modules finish:

    * each 4-D feature map, swapped for a fresh leaf, so a backward pass tells which maps the logits
      depend on *directly* (a map feeding a later recorded map reaches the logits only through that
      map's leaf, so the last map reached is the one nearest the head);
    * each ``nn.Embedding`` that reads the input ids;
    * each ``nn.Linear`` with its output shape.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.x = x
        self.maps: list[tuple[nn.Module, torch.Tensor]] = []
        self.token_embeddings: list[nn.Module] = []
        self.linears: list[tuple[nn.Module, torch.Size]] = []
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules() if m is not model]

    def hook(self, module: nn.Module, inputs: tuple, output):
        if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
            self.linears.append((module, output.shape))
        if _reads_input(module, inputs, self.x):
            self.token_embeddings.append(module)
        if not _is_feature_map(output):
            return None
        leaf = output.detach().requires_grad_()
        self.maps.append((module, leaf))
        return leaf.clone()  # a non-leaf, so an in-place op after the module stays legal

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _name(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), "?") or "<model>"


def _attribution_from(model: nn.Module, probe: _Probe, logits: torch.Tensor) -> nn.Module:
    leaves = [leaf for _, leaf in probe.maps]
    reached = []
    if leaves and logits.requires_grad:
        grads = torch.autograd.grad(logits.float().sum(), leaves, allow_unused=True)
        reached = [module for (module, _), grad in zip(probe.maps, grads) if grad is not None]
    if reached:
        return reached[-1]
    if probe.token_embeddings:
        return probe.token_embeddings[0]
    raise ValueError(
        "attribution_layer: the model has no 4-D feature map (B, C, H, W) with H*W > 1 that reaches the logits "
        "and no nn.Embedding reading its input; pass attribution_layer=<module whose output Grad-CAM weighs>, "
        "or give gradcam a zero share in weights"
    )


def _embedding_from(model: nn.Module, probe: _Probe, logits: torch.Tensor) -> nn.Module:
    fix = ("pass embedding_layer=<the head: the module whose input are the penultimate features>, "
           "or give diversity a zero share in weights")
    if not probe.linears:
        raise ValueError(f"embedding_layer: no nn.Linear ran in the model's forward pass to read features from; {fix}")
    head, shape = probe.linears[-1]
    if shape != logits.shape:
        raise ValueError(
            f"embedding_layer: the last nn.Linear to run, {_name(model, head)!r}, outputs shape {tuple(shape)}, not "
            f"the logits' {tuple(logits.shape)}, so it is not the model's head; {fix}"
        )
    return head


def find_layers(model: nn.Module, x: torch.Tensor, *, attribution: bool = True, embedding: bool = True) -> Layers:
    """The layers the criteria read, found from one forward (and backward) pass of ``model`` on inputs ``x``.

    ``attribution``: the module that produced the last 4-D feature map ``(B, C, H, W)``, ``H*W > 1``,
    that the logits depend on, in execution order (module order would pick a residual block's
    shortcut conv, which runs last, or a squeeze-excitation conv, whose map is 1x1); where a
    container and its last child produce the same map, the container (e.g. a ResNet's last block or
    stage). Without one, the first ``nn.Embedding`` that looks up the input ids (gradient x
    activation on tokens). ``embedding``: the last ``nn.Linear`` to run (``QLinear`` included),
    whose input are the penultimate features; it must output the logits' shape.
    A ``ValueError`` names the argument to pass when either is not found. The model runs in eval
    mode (restored afterwards); parameters receive no gradients.
    """
    was_training = model.training
    probe = _Probe(model, x)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(x)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"model(x) must return a logits tensor, got {type(logits).__name__}")
            found = Layers(attribution=_attribution_from(model, probe, logits) if attribution else None)
        if embedding:
            found.embedding = _embedding_from(model, probe, logits)
        return found
    finally:
        probe.remove()
        model.train(was_training)


class _Capture:
    """Forward hook that swaps the layer's output for a fresh leaf, so its gradient is all we pay for."""

    def __init__(self, layer: nn.Module) -> None:
        self.leaf: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        self.leaf = output.detach().requires_grad_()
        return self.leaf.clone()  # a non-leaf, so an in-place op after the layer stays legal


class _InputCapture:
    """Forward pre-hook keeping the (detached) input of the head: the penultimate features."""

    def __init__(self, layer: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        self.value = inputs[0].detach()


def _target_mask(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"model output {tuple(logits.shape)} does not match targets {tuple(target.shape)} "
            "(expected the targets' shape plus a class dimension)"
        )
    valid = target > IGNORE_INDEX
    return target.clamp(min=0), valid


def _attribution(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    if acts.dim() == 4:  # Grad-CAM on (B, C, H, W) feature maps
        alpha = grads.mean(dim=(2, 3), keepdim=True)
        return torch.relu((alpha * acts).sum(dim=1)).flatten(1).sum(dim=1)
    per_position = torch.relu((grads * acts).sum(dim=-1))  # gradient x activation
    return per_position.reshape(acts.shape[0], -1).sum(dim=1)


def _uncertainty(logits: torch.Tensor, valid: torch.Tensor, measure: str) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "margin":
        top = probs.topk(2, dim=-1).values
        value = 1 - (top[..., 0] - top[..., 1])
    else:
        value = -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=-1)
    return _mean_over_positions(value, valid)


def _mean_over_positions(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if value.dim() == 1:
        return value
    mask = valid.reshape(value.shape).to(value.dtype)
    return (value * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


def _pool_embeddings(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    features = features.detach().float()
    if features.dim() == 2:
        return features
    # a sequence: average its scored positions' features into one vector
    mask = valid.unsqueeze(-1).to(features.dtype)
    return (features * mask).sum(1) / mask.sum(1).clamp(min=1)


def _score_batch(model, x, target, capture: _Capture | None, features: _InputCapture | None, want,
                 measure) -> dict[str, torch.Tensor]:
    with torch.enable_grad():
        logits = model(x)
        target, valid = _target_mask(logits, target)
        out = {}
        if "gradcam" in want:
            if capture.leaf is None:
                raise ValueError("attribution_layer did not run in the model's forward pass")
            chosen = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            (grads,) = torch.autograd.grad((chosen * valid).sum(), capture.leaf, allow_unused=True)
            if grads is None:
                raise ValueError("attribution_layer: its output does not reach the logits")
            out["gradcam"] = _attribution(capture.leaf.detach(), grads)
    logits = logits.detach()
    if "uncertainty" in want:
        out["uncertainty"] = _uncertainty(logits, valid, measure)
    if "diversity" in want:
        if features.value is None:
            raise ValueError("embedding_layer did not run in the model's forward pass")
        out["embeddings"] = _pool_embeddings(features.value, valid)
    return out


def _check_layer(model: nn.Module, layer, name: str) -> None:
    if layer is None:
        return
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{name} must be an nn.Module of the model or None, got {type(layer).__name__}")
    if not any(m is layer for m in model.modules()):
        raise ValueError(f"{name} is not a submodule of model")


def _resolve_layers(model: nn.Module, dataset: Dataset, criteria, attribution_layer, embedding_layer,
                    device) -> Layers:
    """The explicit layers, else the model's own ``attribution_layer``, else :func:`find_layers`."""
    declared = getattr(model, "attribution_layer", None)
    layers = Layers(
        attribution_layer or (declared if isinstance(declared, nn.Module) else None), embedding_layer
    )
    need_attribution = "gradcam" in criteria and layers.attribution is None
    need_embedding = "diversity" in criteria and layers.embedding is None
    if need_attribution or need_embedding:
        x, _ = next(iter(DataLoader(dataset, batch_size=_PROBE_EXAMPLES, shuffle=False)))
        found = find_layers(model, x.to(device), attribution=need_attribution, embedding=need_embedding)
        layers = Layers(layers.attribution or found.attribution, layers.embedding or found.embedding)
    return layers


def compute_scores(
    model: nn.Module,
    dataset: Dataset | Sequence[torch.Tensor],
    *,
    criteria: Sequence[str] = CRITERIA,
    batch_size: int = 256,
    uncertainty: str = "margin",
    attribution_layer: nn.Module | None = None,
    embedding_layer: nn.Module | None = None,
) -> Scores:
    """Score every example of ``dataset`` (``(input, target)`` pairs) under ``criteria``.

    ``attribution_layer`` is the module whose output Grad-CAM inspects (default
    ``model.attribution_layer`` where the model names one, else :func:`find_layers`'s);
    ``embedding_layer`` the module whose *input* diversity clusters, the model's head (default
    :func:`find_layers`'s: the last ``nn.Linear`` to run). The model runs in eval mode (so
    BatchNorm treats examples independently) and is put back in its previous mode afterwards; its
    parameters receive no gradients.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(criteria, str):
        raise TypeError("criteria must be a collection of criterion names, not a single string")
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown:
        raise ValueError(f"criteria has unknown names {unknown}; known: {CRITERIA}")
    if uncertainty not in UNCERTAINTY_MEASURES:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY_MEASURES}, got {uncertainty!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_layer(model, attribution_layer, "attribution_layer")
    _check_layer(model, embedding_layer, "embedding_layer")
    dataset = _as_dataset(dataset)
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    device = model_device(model)
    layers = _resolve_layers(model, dataset, criteria, attribution_layer, embedding_layer, device)
    capture = _Capture(layers.attribution) if "gradcam" in criteria else None
    features = _InputCapture(layers.embedding) if "diversity" in criteria else None
    was_training = model.training
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        model.eval()
        for x, target in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            batch = _score_batch(model, x.to(device), target.to(device), capture, features, set(criteria), uncertainty)
            for key, value in batch.items():
                dtype = torch.float32 if key == "embeddings" else torch.float64  # embeddings are big
                parts.setdefault(key, []).append(value.detach().to("cpu", dtype))
    finally:
        model.train(was_training)
        for hook in (capture, features):
            if hook is not None:
                hook.handle.remove()
    return Scores(**{key: torch.cat(values) for key, values in parts.items()})


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


def build_selection(
    model: nn.Module,
    dataset: Dataset | Sequence[torch.Tensor],
    fraction: float = 0.1,
    weights: Sequence[float] | Mapping[str, float] = (1, 1, 1),
    *,
    seed: int = 0,
    batch_size: int = 256,
    uncertainty: str = "margin",
    attribution_layer: nn.Module | None = None,
    embedding_layer: nn.Module | None = None,
) -> Selection:
    """:func:`build`, also telling which criterion chose each example."""
    check_fraction(fraction)
    shares = normalize_weights(weights)
    needed = [name for name in CRITERIA if shares[name] > 0]
    scores = compute_scores(
        model, dataset, criteria=needed, batch_size=batch_size, uncertainty=uncertainty,
        attribution_layer=attribution_layer, embedding_layer=embedding_layer,
    )
    return select(scores, fraction, weights, seed=seed)


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
) -> torch.Tensor:
    """Sorted int64 indices of the ``round(fraction * len(dataset))`` examples to preserve.

    ``method="criteria"`` scores the examples: ``weights`` are the shares of (gradcam, uncertainty,
    diversity), as a 3-sequence or a mapping; they need not sum to 1 and a zero share skips that
    criterion's computation entirely. See the module docstring for each criterion, and
    :func:`compute_scores` for ``attribution_layer`` and ``embedding_layer``.
    ``method="random"`` is the ablation baseline: :func:`random_subset` of the same size, drawn with
    ``seed``; ``model`` and ``weights`` play no part. ``ValueError`` for an unknown ``method``,
    ``fraction`` outside ``(0, 1]`` or a fraction so small that it selects nothing.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "random":
        n = len(_as_dataset(dataset))
        return random_subset(n, set_size(fraction, n), seed=seed)
    return build_selection(
        model,
        dataset,
        fraction,
        weights,
        seed=seed,
        batch_size=batch_size,
        uncertainty=uncertainty,
        attribution_layer=attribution_layer,
        embedding_layer=embedding_layer,
    ).indices


def random_subset(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """The ablation baseline: ``size`` distinct indices of ``range(n)``, uniformly at random, sorted."""
    for name, value in (("n", n), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= size <= n:
        raise ValueError(f"size must be in [1, n={n}], got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


# ---- files ----------------------------------------------------------------------------------


def _check_indices(indices: torch.Tensor | Sequence[int], dataset_size: int, source: str) -> torch.Tensor:
    values = torch.as_tensor(indices)
    if values.numel() == 0:
        raise ValueError(f"{source}: the preservation set is empty")
    if values.dim() != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(
            f"{source}: indices must be a 1-D integer sequence, got {values.dtype} of shape {tuple(values.shape)}"
        )
    values = values.to(torch.int64)
    if int(values.min()) < 0 or int(values.max()) >= dataset_size:
        low, high = int(values.min()), int(values.max())
        raise ValueError(f"{source}: indices must lie in [0, {dataset_size}), got [{low}, {high}]")
    if values.unique().numel() != values.numel():
        raise ValueError(f"{source}: indices contain duplicates")
    return values


def save(
    indices: torch.Tensor | Sequence[int], path: str | os.PathLike, *, dataset_size: int, meta: dict | None = None
) -> None:
    """Write the set atomically as JSON, recording ``dataset_size`` (and optional JSON-able ``meta``)."""
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
    values = _check_indices(indices, dataset_size, "save")
    path = Path(path)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "dataset_size": dataset_size,
        "size": values.numel(),
        "indices": values.tolist(),
        "meta": meta or {},
    }
    text = json.dumps(record)
    atomic_write(path, text.encode("utf-8"))


def load(path: str | os.PathLike, *, dataset_size: int | None = None) -> torch.Tensor:
    """Read a set written by :func:`save`; ``ValueError`` if it was built for another data set size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preservation set not found: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a preservation-set JSON file ({exc})") from exc
    found = record.get("format") if isinstance(record, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path}: not an sgsc preservation set (format {found!r}, expected {FORMAT!r})")
    if record.get("version") != VERSION:
        version = record.get("version")
        raise ValueError(f"{path}: preservation-set version {version!r} is not supported (expected {VERSION})")
    recorded = record.get("dataset_size")
    if dataset_size is not None and recorded != dataset_size:
        raise ValueError(f"{path}: built for a data set of {recorded} examples, but this one has {dataset_size}")
    if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 1:
        raise ValueError(f"{path}: invalid dataset_size {recorded!r}")
    indices = record.get("indices")
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{path}: indices must be a list of ints")
    values = _check_indices(indices, recorded, str(path))
    if values.numel() != record.get("size"):
        raise ValueError(f"{path}: holds {values.numel()} indices but records size {record.get('size')!r}")
    return values
