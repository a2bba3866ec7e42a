"""What :func:`sgsc.train.loop.compress` was given, read and checked: the preservation set asked for,
the training data split with the guard held out (:func:`guard_split`), the eval sets, the callables a
checkpoint cannot record, and the config with its keyword overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch
from torch.utils.data import TensorDataset

from sgsc.train import preservation
from sgsc.train.arguments import Metric, tensor_pairs
from sgsc.train.batches import seeded_generator, subset
from sgsc.train.config import CompressConfig
from sgsc.train.pruners import Pruner


@dataclass(frozen=True)
class _Preserve:
    """``preserve`` read: a fraction to choose after the warm-up, indices into the training data, a set of
    its own, or nothing."""

    fraction: float | None = None
    indices: list[int] | None = None
    dataset: TensorDataset | None = None

    def describe(self) -> float | str | None:
        if self.indices is not None:
            return f"{len(self.indices)} indices"
        if self.dataset is not None:
            return f"a set of {len(self.dataset)}"
        return self.fraction

    @property
    def given(self) -> bool:
        return self.fraction is not None or self.indices is not None or self.dataset is not None


def _is_indices(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, (list, tuple, range)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value)


def _preserve(preserve, train: TensorDataset) -> _Preserve:
    n = len(train)
    if preserve is None:
        return _Preserve()
    if isinstance(preserve, Real) and not isinstance(preserve, bool):
        try:
            preservation.set_size(preserve, n)
        except ValueError as exc:
            raise ValueError(f"preserve as a fraction of the training data: {exc}") from None
        return _Preserve(fraction=float(preserve))
    if _is_indices(preserve):
        indices = torch.as_tensor(preserve).tolist()
        if not indices:
            raise ValueError("preserve is empty; pass None for unsafe self-compression")
        if len(set(indices)) > n or not all(0 <= i < n for i in indices):
            raise ValueError(f"preserve holds indices outside the {n} examples of train_data (0..{n - 1})")
        if len(set(indices)) != len(indices):
            raise ValueError("preserve repeats indices; each preserved example is listed once")
        return _Preserve(indices=indices)
    data = tensor_pairs("preserve", preserve)
    if len(data) == 0:
        raise ValueError("preserve is empty; pass None for unsafe self-compression")
    if len(data) > n:
        raise ValueError(f"preserve has {len(data)} examples, more than the {n} of train_data; "
                         "the preservation set is a part of the training data")
    return _Preserve(dataset=data)


def _eval_sets(eval_data) -> dict[str, TensorDataset]:
    if eval_data is None:
        return {}
    if isinstance(eval_data, dict):
        if not eval_data:
            raise ValueError("eval_data is an empty dict; pass None to evaluate nothing")
        return {str(name): tensor_pairs(f"eval_data[{name!r}]", value) for name, value in eval_data.items()}
    return {"val": tensor_pairs("eval_data", eval_data)}


@dataclass(frozen=True)
class _Task:
    """The callables of a run, which a checkpoint cannot record: the caller passes them again on resume."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # None: cross-entropy
    metric: str | Metric
    higher_is_better: bool | None
    pruner: Pruner | None


@dataclass
class _Data:
    """The training data split for the run: ``fit`` is what batches and the preservation set are drawn
    from (``fit_index`` maps it to ``train_data``), ``guard`` the held-out or given guard set."""

    train: TensorDataset
    fit: TensorDataset
    fit_index: torch.Tensor
    guard: TensorDataset | None
    guard_index: list[int] | None
    eval_sets: dict[str, TensorDataset]


def guard_split(n: int, fraction: float, seed: int, keep: list[int] | None = None) -> tuple[list[int], list[int]]:
    """``(guard, rest)``: a seeded ``fraction`` of ``range(n)`` (at least one example), never one of ``keep``
    (the preservation set the loss trains on), and the others, both sorted."""
    taken = set(keep or ())
    order = [i for i in torch.randperm(n, generator=seeded_generator(seed, 0x6A7D)).tolist() if i not in taken]
    size = min(max(1, round(fraction * n)), len(order) - 1)
    if size < 1:
        raise ValueError(f"train_data has {n} examples and preserve takes {len(taken)}: none is left to hold out "
                         "as the guard set; pass guard=")
    return sorted(order[:size]), sorted(set(range(n)) - set(order[:size]))


def _split(train: TensorDataset, guard, wants_guard: bool, config: CompressConfig, eval_sets,
           keep: list[int] | None) -> _Data:
    everything = torch.arange(len(train))
    if guard is not None:
        return _Data(train, train, everything, tensor_pairs("guard", guard), None, eval_sets)
    if not wants_guard:
        return _Data(train, train, everything, None, None, eval_sets)
    held, rest = guard_split(len(train), config.guard_fraction, config.seed, keep)
    return _Data(train, subset(train, rest), torch.tensor(rest), subset(train, held), held, eval_sets)


def _config(config: CompressConfig | None, hyper: dict) -> CompressConfig:
    if config is not None and not isinstance(config, CompressConfig):
        raise TypeError(f"config must be an sgsc.CompressConfig or None, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(CompressConfig)}
    unknown = sorted(set(hyper) - names)
    if unknown:
        raise TypeError(f"compress got an unexpected keyword argument {unknown[0]!r}")
    base = config.compression() if hasattr(config, "compression") else config
    return dataclasses.replace(base or CompressConfig(), **hyper)
