"""The run's settings, each declared once: ``CompressConfig`` (the method and its loop) and ``TrainConfig``
(a zoo run: ``CompressConfig`` plus which data, model and files).

Every field carries its default, its check and the help ``sgsc train`` shows (``field.metadata``), so a
new hyper-parameter is one line here: :class:`~sgsc.train.selfcompress.SelfCompression` takes the
fields marked ``method``, :func:`sgsc.compress` all of ``CompressConfig`` (as a config or as keywords),
:func:`sgsc.train.train` a ``TrainConfig``, and the CLI's flags are generated from the fields.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgsc.nn.zoo import available_models
from sgsc.ops.spec import MAX_WIDTH, ROUNDING_MODES
from sgsc.train import preservation
from sgsc.train.arguments import flag, integer, number
from sgsc.train.data import VISION_NAMES

DATA_NAMES = (*VISION_NAMES, "names")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRESERVATION_LOSSES = ("task", "distill", "none")

# Fields that may differ between a checkpoint and the config resuming it: where to stop, and
# bookkeeping that does not change the trajectory.
RESUMABLE_CHANGES = ("steps", "resume", "progress", "checkpoint_every", "threads", "plots", "out_dir")

# The contract's tolerance when safety is on and max_drop is not given: one accuracy point, or the
# same share of a loss in nats (0.05 nats is about 2% of the names decoder's 2.06).
DEFAULT_MAX_DROP = {"accuracy": 0.01, "loss": 0.05}


# ---- checks, each raising with the field's name ------------------------------------------------


def _nonnegative(name, value):
    number(name, value, low=0)


def _positive(name, value):
    number(name, value, low=0, strict=True)


def _count(low: int) -> Callable[[str, Any], None]:
    return lambda name, value: integer(name, value, low=low)


def _share(name, value):
    """A fraction in (0, 1)."""
    number(name, value, low=0, strict=True)
    if value >= 1:
        raise ValueError(f"{name} must be < 1, got {value!r}")


def _optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    return lambda name, value: None if value is None else check(name, value)


def _one_of(allowed: tuple) -> Callable[[str, Any], None]:
    def check(name, value):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    check.choices = allowed
    return check


def _weights(name, value):
    try:
        preservation.normalize_weights(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _confidence(name, value):
    number(name, value, low=0.5, strict=True)
    if value >= 1:
        raise ValueError(f"{name} must be < 1 (a one-sided confidence such as 0.95), got {value!r}")


def param(default, help: str, check: Callable[[str, Any], None], *, method: bool = False, **kind):
    """A config field: its default, the help the CLI shows, its check, and whether
    :class:`~sgsc.train.selfcompress.SelfCompression` reads it (``method``; otherwise only the loop does)."""
    metadata = {"help": help, "check": check, "method": method, **kind}
    if isinstance(default, (list, dict)):  # mutable: each config gets its own copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_fields(config) -> None:
    for f in dataclasses.fields(config):
        f.metadata["check"](f.name, getattr(config, f.name))


# ---- the configs --------------------------------------------------------------------------------


@dataclass
class CompressConfig:
    """Every hyper-parameter of safety-guided self-compression, checked when built."""

    # objective: task + lambda_ * preservation + gamma * bits per weight + alpha * mean|w|
    gamma: float = param(0.02, "weight of the size term (bits per weight)", _nonnegative, method=True)
    alpha: float = param(0.0, "weight of the L1 term (mean |w|)", _nonnegative, method=True)
    lambda_: float = param(1.0, "weight of the preservation term", _nonnegative, method=True, flags=["--lambda"])
    preservation_loss: str = param(
        "distill", "the preservation term: distill (KL at temperature 2 to the reference model's outputs on the "
        "preservation examples; the frontier's best), task (the task loss on them) or none",
        _one_of(PRESERVATION_LOSSES), method=True)
    # safety: the contract
    max_drop: float | None = param(
        None, "the contract: the model returned is within this much of the reference (the model as compression "
        "started) on the guard set, in the metric's units (accuracy as a fraction; nats for loss); unset: "
        f"{DEFAULT_MAX_DROP['accuracy']:g} accuracy or {DEFAULT_MAX_DROP['loss']:g} nats when safety is on",
        _optional(_nonnegative), method=True, type=float)
    confidence: float = param(0.95, "one-sided confidence of the guard check's paired bound", _confidence,
                              method=True)
    guard_fraction: float = param(0.1, "share of the training data held out as the guard set when none is given "
                                  "(no batch and no loss term ever sees it)", _share)
    k: int = param(50, "steps between safety checks", _count(1), method=True, flags=["-k", "--k"])
    patience: int = param(2, "failed checks in a row before the run rolls back to the last that passed (1: at the "
                          "first); compression dips and recovers, and a rollback at every dip undoes the recovery too",
                          _count(1), method=True)
    restore: bool = param(True, "roll back to the last state that passed when a check fails (the contract)", flag,
                          method=True)
    prune: bool = param(True, "physically remove channels/heads/units whose bits stay at zero", flag, method=True)
    # the preservation set (what the preservation term trains on)
    preservation_method: str = param("criteria", "criteria (scored by --preservation-weights) or random "
                                     "(same-size ablation)", _one_of(preservation.METHODS))
    preservation_weights: tuple[float, float, float] = param(
        (1.0, 1.0, 1.0), "shares of the gradcam, uncertainty and diversity criteria", _weights, nargs=3,
        metavar=("GRADCAM", "UNCERTAINTY", "DIVERSITY"))
    preservation_batch: int = param(32, "preservation examples per step", _count(1), method=True)
    preservation_pool: int | None = param(None, "examples scored when choosing the preservation set: a random pool "
                                          "of the training data (unset: all of it)", _optional(_count(1)), type=int)
    # optimisation
    steps: int = param(1000, "total optimiser steps (a resumed run continues up to this many)", _count(0))
    batch_size: int = param(64, "training examples per step and process", _count(1))
    lr: float = param(1e-3, "Adam learning rate of weights, biases and norms", _positive)
    quant_lr: float = param(0.05, "Adam learning rate of bits and exponents (they need much larger steps than "
                            "weights)", _positive, method=True)
    exponent_lr: float | None = param(None, "Adam learning rate of exponents apart from bits (unset: --quant-lr)",
                                      _optional(_positive), method=True, type=float)
    lr_schedule: str = param("constant", "learning-rate schedule of every group: constant, or cosine (decays to 0 "
                             "at the last step)", _one_of(LR_SCHEDULES))
    warmup_steps: int = param(0, "plain training steps before compression starts (bits and exponents still learn "
                              "from the task loss)", _count(0))
    # bookkeeping
    seed: int = param(0, "seed of initialisation, data order, guard split and preservation set", _count(0),
                      method=True)
    eval_every: int = param(100, "steps between evaluations (metrics log, progress bar)", _count(1))
    checkpoint_every: int = param(0, "steps between checkpoints (0: only at the end)", _count(0))
    progress: bool = param(True, "show a progress bar", flag)
    device: str = param("auto", "auto, cpu or cuda", _one_of(DEVICES))

    def __post_init__(self) -> None:
        if isinstance(self.preservation_weights, list):
            self.preservation_weights = tuple(self.preservation_weights)
        check_fields(self)

    @classmethod
    def method_fields(cls) -> tuple[str, ...]:
        """The fields :class:`~sgsc.train.selfcompress.SelfCompression` reads."""
        return tuple(f.name for f in dataclasses.fields(CompressConfig) if f.metadata["method"])

    def max_drop_for(self, metric: str) -> float:
        """``max_drop``, or the default tolerance of ``metric`` (``"accuracy"`` or ``"loss"``)."""
        return self.max_drop if self.max_drop is not None else DEFAULT_MAX_DROP[metric]


def _exists(name, value):
    if value is not None and not Path(value).exists():
        raise FileNotFoundError(f"{name} does not exist: {value}")


def _is_file(name, value):
    if value is not None and not Path(value).is_file():
        raise FileNotFoundError(f"{name} checkpoint not found: {value}")


def _model(name, value):
    if value is not None and value not in available_models():
        raise ValueError(f"{name} must be one of {available_models()}, got {value!r}")


def _mapping(name, value):
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")


def _init_bits(name, value):
    number(name, value, low=1)
    if value > MAX_WIDTH:
        raise ValueError(f"{name} must be <= {MAX_WIDTH}, got {value!r}")


def _path(name, value):
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(value).__name__}")


def _fraction(name, value):
    number(name, value, low=0, strict=True)
    if value > 1:
        raise ValueError(f"{name} must be <= 1, got {value!r}")


@dataclass
class TrainConfig(CompressConfig):
    """A zoo run: :class:`CompressConfig` plus its data, model and files. Defaults train a PaperCNN on
    scikit-learn's digits."""

    data: str = param("digits", "digits (bundled), fashion-mnist, mnist, auto (IDX files if found, else digits) or "
                      "names", _one_of(DATA_NAMES))
    data_dir: str | None = param(None, "directory of the four IDX files (or the names.txt file for --data names)",
                                 _exists, type=str)
    model: str | None = param(None, "model name; if given it must be the data's: paper_cnn, or char_decoder for "
                              "names", _model, type=str)
    model_config: dict = param({}, 'JSON overrides of the model config, e.g. \'{"channels": [16, 32]}\'', _mapping)
    init_bits: float = param(8.0, "bits every group starts with", _init_bits)
    rounding: str = param("nearest", "quantizer rounding: nearest or floor", _one_of(ROUNDING_MODES))
    init_from: str | None = param(None, "checkpoint whose model to start from (architecture and weights, fresh "
                                  "optimiser)", _is_file, type=str)
    fraction: float = param(0.05, "preservation set size as a fraction of the training set, in (0, 1]", _fraction)
    out_dir: str | None = param(None, "output directory (the CLI's default: runs/<timestamp>)", _optional(_path),
                                type=str, flags=["--out"])
    resume: bool = param(False, "continue the run whose checkpoint is in --out, bit for bit", flag)
    plots: bool = param(True, "write PNG plots at the end", flag)
    threads: int | None = param(None, "torch CPU threads (unset: torch's default)", _optional(_count(1)), type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume and self.out_dir is None:
            raise ValueError("resume needs out_dir, the directory holding the run's checkpoint")

    def compression(self) -> CompressConfig:
        """The :class:`CompressConfig` part of this run."""
        names = {f.name for f in dataclasses.fields(CompressConfig)}
        return CompressConfig(**{key: value for key, value in dataclasses.asdict(self).items() if key in names})


def unsafe(config: TrainConfig) -> TrainConfig:
    """The unsafe self-compression baseline of ``config``: no preservation term, no guard, no rollback."""
    return dataclasses.replace(config, lambda_=0.0, restore=False)
