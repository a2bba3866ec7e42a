"""The alternatives a practitioner would try instead of SGSC, all built on the same zoo model and op.

* :func:`post_training_quantize`: per-channel symmetric int-b of a trained float model, no training.
* :func:`fixed_bit_qat`: quantization-aware fine-tuning at a fixed bit depth (the op with frozen ``b``).
* :func:`magnitude_prune`: gradual global magnitude pruning during fine-tuning, then int8.

Every function returns a model whose quantized layers export with :func:`sgsc.export.save_packed`,
so the compared file sizes come from the same packed format.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from sgsc.experiments.common import freeze_bits
from sgsc.nn import quantized_layers
from sgsc.ops.spec import MAX_WIDTH
from sgsc.train import CompressResult, Data, TrainConfig, train


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_WIDTH:
        raise ValueError(f"bits must be an int in [2, {MAX_WIDTH}], got {bits!r}")


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}")


def _fine_tune_config(config: TrainConfig) -> TrainConfig:
    """``config`` as plain fine-tuning: no size term, no preservation loss, no restore or pruning."""
    return dataclasses.replace(config, gamma=0.0, alpha=0.0, lambda_=0.0, restore=False, prune=False, warmup_steps=0)


@torch.no_grad()
def calibrate(model: nn.Module, bits: int) -> nn.Module:
    """Per-channel symmetric calibration in place: step ``max|w| / (2^(b-1) - 1)``, ``b`` frozen.

    The usual per-channel PTQ scale. Unlike the layers' default power-of-two initial exponent it
    wastes none of the code range, and the packed format stores any float32 scale.
    """
    _check_bits(bits)
    freeze_bits(model, float(bits))
    for _, layer in quantized_layers(model):
        if not layer.weight.numel():
            continue
        peak = layer.grouped(layer.weight.detach().float()).abs().amax(dim=1)
        exponent = torch.log2(peak / (2.0 ** (bits - 1) - 1))
        layer.exponent.copy_(torch.where(peak > 0, exponent, torch.zeros_like(exponent)))
    return model


def post_training_quantize(model: nn.Module, bits: int) -> nn.Module:
    """A per-channel int-``bits`` copy of the trained float ``model`` (no data, no training)."""
    return calibrate(copy.deepcopy(model), bits)


def fixed_bit_qat(model: nn.Module, bits: int, config: TrainConfig, data: Data) -> CompressResult:
    """Fine-tune a calibrated int-``bits`` copy of ``model`` for ``config.steps`` with ``b`` frozen.

    Weights and exponents (the step sizes) train, as in LSQ-style QAT. Returns :func:`train`'s result.
    """
    return train(_fine_tune_config(config), model=post_training_quantize(model, bits), data=data)


def on_training_step(model: nn.Module, callback: Callable[[nn.Module, int], None]):
    """Call ``callback(model, step)`` before every training-mode forward; returns the hook handle.

    The trainer runs exactly one training-mode forward per step (evaluation runs in eval mode), and
    has no per-step callback of its own, so this is how a schedule follows its steps.
    """
    counter = {"step": 0}

    def hook(module: nn.Module, inputs) -> None:
        if module.training:
            callback(module, counter["step"])
            counter["step"] += 1

    return model.register_forward_pre_hook(hook)


def cubic_sparsity(step: int, end: int, final: float) -> float:
    """Zhu & Gupta's gradual schedule: ``final * (1 - (1 - step/end)^3)``, flat at ``final`` after ``end``."""
    progress = min(step / end, 1.0)
    return final * (1.0 - (1.0 - progress) ** 3)


class MagnitudeSchedule:
    """Global magnitude pruning of every quantized weight, raised along :func:`cubic_sparsity`.

    Sparsity is updated at ``updates`` evenly spaced steps over the first 75% of ``steps``, so the
    last quarter fine-tunes a fixed mask. Pruning uses ``torch.nn.utils.prune`` (masks on the
    layers, gradients of pruned weights masked); later updates prune among the surviving weights.
    """

    def __init__(self, model: nn.Module, sparsity: float, steps: int, updates: int = 8) -> None:
        _check_sparsity(sparsity)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2 (prune, then fine-tune), got {steps!r}")
        self.targets = [(layer, "weight") for _, layer in quantized_layers(model) if layer.weight.numel()]
        self.total = sum(layer.weight.numel() for layer, _ in self.targets)
        self.final = sparsity
        self.end = max(1, int(0.75 * steps))
        every = max(1, self.end // updates)
        self.update_steps = set(range(every, self.end + 1, every)) | {self.end}
        self.pruned = 0

    def __call__(self, model: nn.Module, step: int) -> None:
        if step not in self.update_steps:
            return
        goal = math.floor(cubic_sparsity(step, self.end, self.final) * self.total)
        if goal > self.pruned:
            # an int amount counts weights among those not yet pruned
            prune.global_unstructured(self.targets, pruning_method=prune.L1Unstructured, amount=goal - self.pruned)
            self.pruned = goal

    def finish(self) -> None:
        """Make the masks permanent: the zeros move into ``weight`` and the hooks go."""
        for layer, name in self.targets:
            if prune.is_pruned(layer):
                prune.remove(layer, name)


def magnitude_prune(model: nn.Module, sparsity: float, config: TrainConfig, data: Data) -> tuple[CompressResult, float]:
    """Fine-tune a float copy of ``model`` while pruning to ``sparsity``, then calibrate it to int8.

    Returns :func:`train`'s result with ``model`` replaced by the int8 model, and the fraction of
    quantized weights that are exactly zero after int8.
    """
    pruned = copy.deepcopy(model)
    schedule = MagnitudeSchedule(pruned, sparsity, config.steps)
    handle = on_training_step(pruned, schedule)
    try:
        result = train(_fine_tune_config(config), model=pruned, data=data)
    finally:
        handle.remove()
        schedule.finish()
    int8 = calibrate(pruned, 8)
    weights = [layer.quantized_weight().detach() for _, layer in quantized_layers(int8) if layer.weight.numel()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return dataclasses.replace(result, model=int8), zeros
