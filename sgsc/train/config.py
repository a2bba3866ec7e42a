"""``TrainConfig``: everything a training run depends on, checked when it is built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from sgsc.nn.zoo import available_models
from sgsc.ops.spec import MAX_WIDTH, ROUNDING_MODES
from sgsc.train import preservation
from sgsc.train.data import VISION_NAMES

DATA_NAMES = (*VISION_NAMES, "names")
LR_SCHEDULES = ("constant", "cosine")

# Fields that may differ between a checkpoint and the config resuming it: where to stop, and
# bookkeeping that does not change the trajectory.
RESUMABLE_CHANGES = ("steps", "resume", "progress", "checkpoint_every", "threads", "plots", "out_dir")


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults train a PaperCNN on scikit-learn's digits."""

    # data and model
    data: str = "digits"  # digits | fashion-mnist | mnist | auto (IDX if found) | names (decoder)
    data_dir: str | None = None  # directory of the four IDX files, or the names.txt file
    model: str | None = None  # registered model name; None: paper_cnn, or char_decoder for names
    model_config: dict = field(default_factory=dict)  # overrides, e.g. {"channels": [16, 32]}
    init_bits: float = 8.0
    rounding: str = "nearest"  # nearest | floor, for every quantized layer
    init_from: str | None = None  # a checkpoint to compress (architecture + weights, fresh optimiser)
    # optimisation
    steps: int = 1000
    batch_size: int = 64  # per process
    lr: float = 1e-3  # Adam, weights, biases and norms
    quant_lr: float = 0.05  # Adam, bits and exponents: they need much larger steps than weights
    exponent_lr: float | None = None  # Adam, exponents apart from bits; None: quant_lr
    lr_schedule: str = "constant"  # constant | cosine (every group decays to 0 at the last step)
    # steps with no size, L1, preservation or safety first; bits and exponents still learn from the task loss
    warmup_steps: int = 0
    # objective
    alpha: float = 0.0  # L1 weight
    gamma: float = 0.02  # size (bits per weight) weight
    lambda_: float = 1.0  # preservation loss weight
    # safety
    restore: bool = True
    prune: bool = True  # remove units whose bits stayed at zero over a safe check
    fraction: float = 0.05  # preservation set size, as a fraction of the training set
    preservation_method: str = "criteria"  # criteria (scored with preservation_weights) | random (ablation)
    preservation_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # gradcam, uncertainty, diversity
    preservation_batch: int = 32
    k: int = 50  # steps between safety checks
    threshold: float = 0.02  # tolerated drop: accuracy points (0..1), or nats of loss for names
    # bookkeeping
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 0  # 0: only at the end
    out_dir: str | None = None  # None: write nothing (the CLI defaults to runs/<timestamp>)
    resume: bool = False
    plots: bool = True
    progress: bool = True
    threads: int | None = None  # torch.set_num_threads; None leaves it alone
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _validate(self)


def _check_number(name: str, value, *, low=None, high=None, integer=False, strict=False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be {'an int' if integer else 'a finite number'}, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def _validate(c: TrainConfig) -> None:
    for name in ("alpha", "gamma", "lambda_", "threshold"):
        _check_number(name, getattr(c, name), low=0)
    for name in ("lr", "quant_lr"):
        _check_number(name, getattr(c, name), low=0, strict=True)
    for name, low in (("steps", 0), ("batch_size", 1), ("warmup_steps", 0), ("k", 1), ("eval_every", 1),
                      ("checkpoint_every", 0), ("preservation_batch", 1), ("seed", 0)):
        _check_number(name, getattr(c, name), low=low, integer=True)
    _check_number("fraction", c.fraction, low=0, high=1, strict=True)
    _check_number("init_bits", c.init_bits, low=1, high=MAX_WIDTH)
    if c.threads is not None:
        _check_number("threads", c.threads, low=1, integer=True)
    if c.exponent_lr is not None:
        _check_number("exponent_lr", c.exponent_lr, low=0, strict=True)
    if c.data not in DATA_NAMES:
        raise ValueError(f"data must be one of {DATA_NAMES}, got {c.data!r}")
    if c.model is not None and c.model not in available_models():
        raise ValueError(f"model must be one of {available_models()}, got {c.model!r}")
    if c.rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {c.rounding!r}")
    if c.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {c.lr_schedule!r}")
    if c.preservation_method not in preservation.METHODS:
        raise ValueError(f"preservation_method must be one of {preservation.METHODS}, got {c.preservation_method!r}")
    if c.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {c.device!r}")
    if not isinstance(c.model_config, dict):
        raise ValueError(f"model_config must be a dict, got {type(c.model_config).__name__}")
    try:
        preservation.normalize_weights(c.preservation_weights)
    except ValueError as exc:
        raise ValueError(f"preservation_weights: {exc}") from None
    if c.data_dir is not None and not Path(c.data_dir).exists():
        raise FileNotFoundError(f"data_dir does not exist: {c.data_dir}")
    if c.init_from is not None and not Path(c.init_from).is_file():
        raise FileNotFoundError(f"init_from checkpoint not found: {c.init_from}")
    if c.resume and c.out_dir is None:
        raise ValueError("resume needs out_dir, the directory holding the run's checkpoint")


def unsafe(config: TrainConfig) -> TrainConfig:
    """The unsafe self-compression baseline of ``config``: no preservation loss, no restore."""
    return dataclasses.replace(config, lambda_=0.0, restore=False)
