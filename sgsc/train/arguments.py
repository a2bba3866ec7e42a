"""The checks every public entry point of the trainer applies to its arguments, with errors naming them.

``SelfCompression`` and ``compress`` take the same arguments; they check them here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sgsc.nn import quantized_layers
from sgsc.train.data import IGNORE_INDEX
from sgsc.train.task import evaluate, mean_loss, model_device

# built-in preservation metrics (sgsc.train.evaluate's keys) -> whether higher is better
METRICS = {"accuracy": True, "loss": False}

Metric = Callable[[nn.Module, TensorDataset], float]


def number(name: str, value, *, low: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (value <= low if strict else value < low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def integer(name: str, value, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def quantized_model(model) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("model must be the module inside DistributedDataParallel (ddp.module), not the wrapper")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(layer.weight.numel() for _, layer in quantized_layers(model)):
        raise ValueError("model has no quantized layers with weights; call sgsc.quantize_model(model) first")
    return model


def tensor_pairs(name: str, value) -> TensorDataset:
    """``value`` (a Dataset or DataLoader of ``(input, target)`` pairs, or an ``(inputs, targets)`` pair of
    tensors) as one TensorDataset, read whole; errors name the argument ``name``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in value):
            raise TypeError(f"{name} given as a pair must be (inputs, targets) tensors with a batch dimension")
        inputs, targets = value
        if len(inputs) != len(targets):
            raise ValueError(f"{name} has {len(inputs)} inputs but {len(targets)} targets")
        return TensorDataset(inputs, targets)
    if isinstance(value, TensorDataset) and len(value.tensors) == 2:
        return value
    if isinstance(value, (Dataset, DataLoader)):
        return read_all(name, value if isinstance(value, DataLoader) else DataLoader(value, batch_size=256))
    raise TypeError(
        f"{name} must be a Dataset or DataLoader of (input, target) pairs, or an (inputs, targets) "
        f"pair of tensors, got {type(value).__name__}"
    )


def read_all(name: str, loader: DataLoader) -> TensorDataset:
    inputs, targets = [], []
    for item in loader:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, torch.Tensor) for t in item)):
            raise TypeError(f"{name} must yield (input, target) tensor pairs, got a {type(item).__name__}")
        inputs.append(item[0])
        targets.append(item[1])
    if not inputs:
        raise ValueError(f"{name} is empty")
    return TensorDataset(torch.cat(inputs), torch.cat(targets))


def metric_of(metric: str | Metric, higher_is_better: bool | None, task_loss=None) -> tuple[Metric, bool]:
    """The safety metric and its direction; ``"loss"`` is the mean of a custom ``task_loss``, where given."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"metric must be a callable or one of {tuple(METRICS)}, got {metric!r}")
        if higher_is_better is not None and higher_is_better != METRICS[metric]:
            raise ValueError(f"higher_is_better={higher_is_better} contradicts metric={metric!r}; leave it None")
        if metric == "loss" and task_loss is not None:
            return (lambda model, data: mean_loss(model, data, task_loss)), False
        return (lambda model, data: evaluate(model, data)[metric]), METRICS[metric]
    if not callable(metric):
        raise TypeError(f"metric must be a callable or one of {tuple(METRICS)}, got {type(metric).__name__}")
    if higher_is_better is None:
        raise ValueError("higher_is_better must be given with a metric callable: is a larger value better?")
    return metric, flag("higher_is_better", higher_is_better)


def check_task_data(model: nn.Module, sets: dict[str, TensorDataset], task_loss) -> None:
    """Name a data set the run cannot use, before anything trains: inputs the model cannot run on (one
    forward of two examples, in eval mode), or, under the default cross-entropy (``task_loss`` None),
    targets that are not class indices in ``[-1, classes)`` (-1 marks padding)."""
    classes = None
    for name, data in sets.items():
        inputs, targets = data.tensors
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                outputs = model(inputs[:2].to(model_device(model)))
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise TypeError(f"{name}: the model cannot run on its inputs ({inputs.dtype}, "
                            f"{tuple(inputs.shape[1:])} per example): {reason}") from None
        finally:
            model.train(was_training)
        if task_loss is not None:
            continue
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"{name}: targets are {targets.dtype}; the default loss, cross-entropy, takes class "
                            "indices (an integer dtype); pass task_loss= (and metric='loss') for other targets")
        classes = outputs.shape[-1] if classes is None else classes
        low, high = int(targets.min()), int(targets.max())
        if low < IGNORE_INDEX or high >= classes:
            raise ValueError(f"{name}: targets run from {low} to {high}, but the model scores {classes} classes "
                             f"(0..{classes - 1}; {IGNORE_INDEX} marks padding)")
