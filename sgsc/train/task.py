"""The task: data sets and the model they imply, the loss, and evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sgsc.nn import quantized_layers
from sgsc.nn.zoo import build_model
from sgsc.train.data import IGNORE_INDEX, load_names, load_vision

if TYPE_CHECKING:  # the config imports the argument checks, which import this module
    from sgsc.train.config import TrainConfig


@dataclass
class Data:
    """The three splits as TensorDatasets, what the task is and the model it implies."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    language: bool  # next-token targets (B, T) with IGNORE_INDEX padding, scored by loss
    model_name: str
    model_config: dict
    source: str


def load_data(config: TrainConfig) -> Data:
    """Read the data set ``config`` names (nothing is downloaded) and the matching model defaults."""
    if config.data == "names":
        block_size = config.model_config.get("block_size", 16)
        names = load_names(config.data_dir, seed=config.seed)
        splits = [names.blocks(split, block_size) for split in ("train", "val", "test")]
        model_config = {"vocab_size": names.vocab.size, "block_size": block_size}
        return Data(*splits, language=True, model_name="char_decoder", model_config=model_config, source=names.source)
    vision = load_vision(config.data_dir, config.data, seed=config.seed)
    model_config = {
        "in_channels": vision.in_channels, "image_size": vision.image_size, "num_classes": vision.num_classes
    }
    return Data(vision.train, vision.val, vision.test, False, "paper_cnn", model_config, vision.source)


def new_model(config: TrainConfig, data: Data) -> nn.Module:
    """A freshly initialised model for ``data`` (seeded by the caller)."""
    if config.model is not None and config.model != data.model_name:
        raise ValueError(f"model {config.model!r} does not fit data {config.data!r}, which needs {data.model_name!r}")
    settings = {**data.model_config, "rounding": config.rounding, **config.model_config}
    return build_model(data.model_name, settings, init_bits=config.init_bits)


# ---- objective and evaluation ---------------------------------------------------------------


def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension; sequence padding (``IGNORE_INDEX``) is not scored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


def mean_abs_weight(model: nn.Module) -> torch.Tensor:
    """The L1 term: mean ``|w|`` over every quantized layer's float weights."""
    unique = {id(layer.weight): layer.weight for _, layer in quantized_layers(model)}  # a tied weight once
    weights = [w for w in unique.values() if w.numel()]
    return torch.stack([w.abs().sum() for w in weights]).sum() / sum(w.numel() for w in weights)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s tensors are: those of its first parameter, else buffer (a model on the packed runtime may
    hold buffers only), else the CPU (a model with no tensors at all)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


# Inference batches in evaluation and the guard's checks: at 512 the paper CNN's activations leave the
# cache and an eval example costs about 1.5x what it costs at 128 on one CPU thread (ResNet-20 1.2x).
EVAL_BATCH = 128


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset | tuple[torch.Tensor, torch.Tensor],
             batch_size: int = EVAL_BATCH) -> dict:
    """``{"loss", "accuracy"}`` of ``model`` on ``data``, in eval mode (the mode is put back).

    Accuracy counts every scored target (each valid next character of a sequence).
    """
    x_all, y_all = data.tensors if isinstance(data, TensorDataset) else data
    device = model_device(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for start in range(0, len(x_all), batch_size):
            x, y = x_all[start : start + batch_size].to(device), y_all[start : start + batch_size].to(device)
            logits = model(x)
            valid = y != IGNORE_INDEX
            n = int(valid.sum())
            loss_sum += float(task_loss(logits, y)) * n
            correct += int((logits.argmax(-1) == y)[valid].sum())
            count += n
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}


@torch.no_grad()
def mean_loss(model: nn.Module, data: TensorDataset, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              batch_size: int = EVAL_BATCH) -> float:
    """The mean of ``loss(model(x), y)`` over ``data``'s batches, weighted by their length, in eval mode."""
    x_all, y_all = data.tensors
    device = model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(x_all), batch_size):
            x, y = x_all[start : start + batch_size].to(device), y_all[start : start + batch_size].to(device)
            total += float(loss(model(x), y)) * len(x)
    finally:
        model.train(was_training)
    return total / max(len(x_all), 1)
