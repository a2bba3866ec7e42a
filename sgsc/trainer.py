"""Safety-guided self-compression: one training loop, with restore and prune as small policies.

The objective (per step, on a training batch and a preservation batch)::

    loss = task_loss + alpha * mean|w| + gamma * average_bits(model) + lambda_ * preservation_loss

``mean|w|`` is the mean absolute weight of the quantized layers and ``average_bits`` the bits per
quantized weight (the paper's size term). The training and preservation batches go through the
model as one batch (DDP allows one forward per backward), so BatchNorm statistics see both.

Every ``k`` steps the preservation set is evaluated (accuracy for classifiers, loss for the
language model). If it is more than ``threshold`` worse than the best value seen since
compression began, the groups whose storage width fell since the last safe check get their bits
back (:func:`restore_groups`). Otherwise the check is safe: the units whose bits have been zero
since the previous safe check are removed physically (:mod:`sgsc.pruning`; a unit thus survives
one check at zero bits, where restore can still bring it back) and the bits are snapshotted.
``lambda_=0, restore=False`` is the unsafe self-compression baseline (:func:`unsafe`).

Determinism: the batch of step ``s`` is a pure function of ``(seed, s, rank)``, so the data-order
state is the step counter; a checkpoint holds model, optimiser, RNG states, step, the safety state
(best value, bits snapshot, preservation set) and the history, and ``resume=True`` continues a run
bit for bit. Under ``torchrun`` the loop runs DistributedDataParallel (gloo on CPU, nccl on GPU);
safety decisions are taken on rank 0 and broadcast, and the wrapper is rebuilt after pruning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from sgsc import export, preservation
from sgsc._io import atomic_write
from sgsc.data import IGNORE_INDEX, VISION_NAMES, load_names, load_vision
from sgsc.layers import (
    MAX_BITS,
    average_bits,
    model_bits_report,
    quantized_layers,
    storage_bits,
)
from sgsc.models import available_models, build_model, model_name
from sgsc.pruning import common_units, dead_units, freeze_empty_layers, prune
from sgsc.reference import ROUNDING_MODES

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PACKED = "model.sgsc"
CHECKPOINT_FORMAT = "sgsc.train"
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
    _check_number("init_bits", c.init_bits, low=1, high=MAX_BITS)
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


# ---- data -----------------------------------------------------------------------------------


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
    weights = [layer.weight for _, layer in quantized_layers(model) if layer.weight.numel()]
    return torch.stack([w.abs().sum() for w in weights]).sum() / sum(w.numel() for w in weights)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset | tuple[torch.Tensor, torch.Tensor], batch_size: int = 512) -> dict:
    """``{"loss", "accuracy"}`` of ``model`` on ``data``, in eval mode (the mode is put back).

    Accuracy counts every scored target (each valid next character of a sequence).
    """
    x_all, y_all = data.tensors if isinstance(data, TensorDataset) else data
    device = next(model.parameters()).device
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


def model_bytes(model: nn.Module) -> dict:
    """Size of ``model`` stored compressed: packed weights plus float32 for everything else.

    ``weight_bytes`` is the quantized weight payload at integer widths; ``bytes`` adds one byte of
    width and one of exponent per live group, and 4 bytes per other parameter (biases, norms,
    embeddings).
    """
    report = model_bits_report(model)
    quant = {id(p) for _, layer in quantized_layers(model) for p in (layer.weight, layer.bits, layer.exponent)}
    others = sum(p.numel() for p in model.parameters() if id(p) not in quant)
    live_groups = sum(int((layer.bits > 0).sum()) for _, layer in quantized_layers(model))
    weight_bytes = math.ceil(report["storage_bits"] / 8)
    return {"weight_bytes": weight_bytes, "bytes": weight_bytes + 2 * live_groups + 4 * others}


# ---- safety policies: restore and prune -----------------------------------------------------


def preservation_metric(model: nn.Module, preserved: TensorDataset, language: bool) -> float:
    """What the safety check watches: accuracy on the preservation set, or loss for a language model."""
    result = evaluate(model, preserved)
    return result["loss"] if language else result["accuracy"]


def bits_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized layer's bits, detached on the CPU: the state of the last safe check."""
    return {name: layer.bits.detach().float().cpu().clone() for name, layer in quantized_layers(model)}


def dropped(metric: float, best: float, threshold: float, language: bool) -> bool:
    """Whether the preservation metric fell more than ``threshold`` below the best seen."""
    return metric > best + threshold if language else metric < best - threshold


def lowered_groups(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Groups whose storage width (``ceil(b)``, 0 when pruned) fell since ``snapshot``."""
    lowered = {}
    for name, layer in quantized_layers(model):
        before = snapshot.get(name)
        if before is None or before.shape != layer.bits.shape:
            continue
        groups = (storage_bits(layer.bits.cpu()) < storage_bits(before)).nonzero().flatten().tolist()
        if groups:
            lowered[name] = groups
    return lowered


@torch.no_grad()
def restore_groups(model: nn.Module, optimizer: torch.optim.Optimizer, snapshot: dict, groups: dict) -> int:
    """Give ``groups`` back their bits from ``snapshot``; returns how many groups were raised.

    Adam's first moment of each restored bit is zeroed, so stale momentum does not carry it
    straight back down; its second moment (the step-size scale) is kept.
    """
    layers = dict(quantized_layers(model))
    count = 0
    for name, index in groups.items():
        bits = layers[name].bits
        where = torch.tensor(index, dtype=torch.long, device=bits.device)
        bits[where] = snapshot[name].to(bits.device)[where]
        state = optimizer.state.get(bits, {})
        if "exp_avg" in state:
            state["exp_avg"][where] = 0
        count += len(index)
    return count


def decide(model: nn.Module, config: TrainConfig, state: dict, preserved: TensorDataset | None, language: bool) -> dict:
    """The safety check's decision (taken on rank 0): what to restore, or what to prune."""
    metric = preservation_metric(model, preserved, language) if preserved is not None else None
    best = state["best"]
    if config.restore and metric is not None and best is not None and dropped(metric, best, config.threshold, language):
        return {"metric": metric, "restore": lowered_groups(model, state["snapshot"]), "prune": {}}
    confirmed = common_units(dead_units(model), dead_units(model, state["snapshot"])) if config.prune else {}
    return {"metric": metric, "restore": None, "prune": confirmed}


def apply_decision(model: nn.Module, optimizer, state: dict, decision: dict, language: bool) -> dict:
    """Carry out :func:`decide`'s decision on this rank; returns the event to log."""
    event = {"kind": "check", "step": state["step"], "metric": decision["metric"], "best": state["best"]}
    if decision["restore"] is not None:
        event["restored"] = restore_groups(model, optimizer, state["snapshot"], decision["restore"])
        return event
    metric = decision["metric"]
    if metric is not None:
        better = state["best"] is None or (metric < state["best"] if language else metric > state["best"])
        state["best"] = metric if better else state["best"]
    event["pruned"] = prune(model, optimizer, decision["prune"]) if decision["prune"] else {}
    state["snapshot"] = bits_snapshot(model)
    return event


# ---- distributed ----------------------------------------------------------------------------


def _setup_distributed(config: TrainConfig) -> tuple[bool, torch.device]:
    """Join the process group torchrun describes; returns (whether we created it, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return created, device
    return created, torch.device("cpu")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(compute):
    """``compute()`` evaluated on rank 0 and broadcast to every rank (just called when alone)."""
    rank, world = _rank_world()
    if world == 1:
        return compute()
    box = [compute() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if _rank_world()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


# ---- batches --------------------------------------------------------------------------------


def _generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints through NumPy's SeedSequence hashing."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator().manual_seed(seed)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Training examples of ``step`` on ``rank``: epoch-wise seeded permutations, cut in batches.

    A pure function of its arguments, which is what makes resuming exact.
    """
    per_epoch = n // (batch_size * world)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=_generator(seed, epoch))
    start = (position * world + rank) * batch_size
    return order[start : start + batch_size]


def _subset(data: TensorDataset, indices: list[int]) -> TensorDataset | None:
    return TensorDataset(*(t[indices] for t in data.tensors)) if indices else None


def _batch(data: TensorDataset, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.tensors
    return x[index].to(device), y[index].to(device)


# ---- checkpoints ----------------------------------------------------------------------------


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, state: dict, config: TrainConfig) -> None:
    """Write everything a bit-exact resume needs, atomically (temp file, then ``os.replace``)."""
    record = {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(config),
        "model_name": model_name(model),
        "model_config": dataclasses.asdict(model.config),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "state": state,
        "rng": _rng_state(),
        "world_size": _rank_world()[1],  # the data order depends on it: resume on as many processes
    }
    atomic_write(path, lambda handle: torch.save(record, handle))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an sgsc training checkpoint")
    return record


def model_from_checkpoint(record: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The (possibly pruned) model a checkpoint holds, rebuilt from its config."""
    model = build_model(record["model_name"], record["model_config"])
    model.load_state_dict(record["model_state"])
    freeze_empty_layers(model)
    return model.to(device)


def _check_resumable(config: TrainConfig, saved: dict, path: Path) -> None:
    current = dataclasses.asdict(config)
    # a field a checkpoint predates ran at its default: new fields default to the old behaviour
    saved = {**dataclasses.asdict(TrainConfig()), **saved}
    free = RESUMABLE_CHANGES if config.lr_schedule == "constant" else tuple(k for k in RESUMABLE_CHANGES if k != "steps")
    # a decaying schedule is a function of the run's length, so a longer resume would change its past
    differ = [k for k in current if k not in free and json.dumps(current[k]) != json.dumps(saved.get(k))]
    if differ:
        detail = ", ".join(f"{k}={saved.get(k)!r} in the checkpoint, {current[k]!r} now" for k in differ)
        raise ValueError(f"resume: {path} was written by a different config ({detail})")


# ---- the loop -------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam: weights/biases/norms at ``lr`` (group "weights"), bits and exponents at ``quant_lr``.

    Bits and exponents share one group ("quantizers") unless ``exponent_lr`` is set; then they are
    "bits" at ``quant_lr`` and "exponents" at ``exponent_lr``. The single group stays the default
    so that the optimiser state of earlier checkpoints still loads.
    """
    layers = [layer for _, layer in quantized_layers(model)]
    bits, exponents = {id(layer.bits) for layer in layers}, {id(layer.exponent) for layer in layers}
    params = list(model.parameters())

    def group(name: str, ids: set[int], lr: float) -> dict:
        return {"params": [p for p in params if id(p) in ids], "lr": lr, "name": name}

    weights = group("weights", {id(p) for p in params} - bits - exponents, config.lr)
    if config.exponent_lr is None:
        return torch.optim.Adam([weights, group("quantizers", bits | exponents, config.quant_lr)])
    return torch.optim.Adam([weights, group("bits", bits, config.quant_lr),
                             group("exponents", exponents, config.exponent_lr)])


def lr_factor(config: TrainConfig, step: int) -> float:
    """The multiplier of every group's learning rate at ``step`` (0-based) of ``config.steps``."""
    if config.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


def _set_learning_rates(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> None:
    base = {"weights": config.lr, "quantizers": config.quant_lr, "bits": config.quant_lr,
            "exponents": config.quant_lr if config.exponent_lr is None else config.exponent_lr}
    factor = lr_factor(config, step)
    for group in optimizer.param_groups:
        group["lr"] = base[group["name"]] * factor


def _initial_state() -> dict:
    return {"step": 0, "best": None, "snapshot": None, "preservation": None, "history": []}


def _start_compression(model, config: TrainConfig, data: Data, state: dict) -> None:
    """Choose the preservation set with the current model and take the first safety reference."""
    if config.lambda_ > 0 or config.restore:
        selected = _from_rank0(lambda: preservation.build(
            model, data.train, config.fraction, config.preservation_weights, method=config.preservation_method,
            seed=config.seed,
        ).tolist())
        state["preservation"] = selected
        state["best"] = _from_rank0(lambda: preservation_metric(model, _subset(data.train, selected), data.language))
    else:
        state["preservation"] = []
    state["snapshot"] = bits_snapshot(model)


def _train_step(model, wrapped, optimizer, config: TrainConfig, data: Data, preserved, state: dict, device) -> dict:
    rank, world = _rank_world()
    step = state["step"]
    compressing = step >= config.warmup_steps
    x, y = _batch(data.train, batch_indices(len(data.train), config.batch_size, step, config.seed, rank, world), device)
    n_task = len(x)
    use_preservation = compressing and config.lambda_ > 0 and preserved is not None
    if use_preservation:
        generator = _generator(config.seed, step, rank, 1)
        pick = torch.randint(0, len(preserved), (config.preservation_batch,), generator=generator)
        px, py = _batch(preserved, pick, device)
        # one forward over both batches: DDP allows one forward per backward
        x, y = torch.cat([x, px]), torch.cat([y, py])
    logits = wrapped(x)
    parts = {"task_loss": task_loss(logits[:n_task], y[:n_task])}
    loss = parts["task_loss"]
    if use_preservation:
        parts["preservation_loss"] = task_loss(logits[n_task:], y[n_task:])
        loss = loss + config.lambda_ * parts["preservation_loss"]
    if compressing and config.gamma > 0:
        parts["size"] = average_bits(model)
        loss = loss + config.gamma * parts["size"]
    if compressing and config.alpha > 0:
        parts["l1"] = mean_abs_weight(model)
        loss = loss + config.alpha * parts["l1"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), **{key: float(value.detach()) for key, value in parts.items()}}


def _eval_record(model, data: Data, step: int) -> dict:
    val, test = evaluate(model, data.val), evaluate(model, data.test)
    bits = float(average_bits(model).detach())
    return {"kind": "eval", "step": step, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "test_loss": test["loss"], "test_accuracy": test["accuracy"], "bits": bits, **model_bytes(model)}


class _Log:
    """The history (kept in the checkpoint) mirrored to ``metrics.jsonl`` on rank 0."""

    def __init__(self, history: list, out: Path | None) -> None:
        self.history, self.path = history, (out / METRICS if out else None)
        if self.path is not None:  # on resume, drop whatever the interrupted run logged after its checkpoint
            atomic_write(self.path, lambda h: h.write("".join(json.dumps(r) + "\n" for r in history).encode()))

    def __call__(self, record: dict) -> None:
        self.history.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def _check_fits(model: nn.Module, data: Data, source: str) -> None:
    if model_name(model) != data.model_name:
        raise ValueError(f"init_from: {source} holds a {model_name(model)}, data {data.source} needs a {data.model_name}")
    saved = dataclasses.asdict(model.config)
    differ = {key: (saved[key], value) for key, value in data.model_config.items() if saved.get(key) != value}
    if differ:
        detail = ", ".join(f"{key}={a} in the checkpoint, {b} in the data" for key, (a, b) in differ.items())
        raise ValueError(f"init_from: {source} does not fit data {data.source} ({detail})")


def _load_model(config: TrainConfig, data: Data, model: nn.Module | None, resumed: dict | None, device) -> nn.Module:
    if resumed is not None:
        return model_from_checkpoint(resumed, device)
    if model is not None:
        return _use_rounding(model, config.rounding).to(device)
    if config.init_from is not None:
        model = model_from_checkpoint(load_checkpoint(config.init_from), device)
        _check_fits(model, data, config.init_from)
        return _use_rounding(model, config.rounding)
    return new_model(config, data).to(device)


def _use_rounding(model: nn.Module, rounding: str) -> nn.Module:
    """Switch every quantized layer of ``model`` to ``rounding``, in place.

    Rounding is the one setting of an architecture a run may change. The model's config (what an
    export records) follows where the model has one: a user's ``quantize_model`` network has none.
    """
    for _, layer in quantized_layers(model):
        layer.rounding = rounding
    if hasattr(getattr(model, "config", None), "rounding"):
        model.config.rounding = rounding
    return model


def train(config: TrainConfig, model: nn.Module | None = None, data: Data | None = None) -> dict:
    """Train (and compress) under ``config``; returns final metrics, the model and the history.

    ``model`` (optional) is trained in place instead of a fresh or ``init_from`` model (ignored when
    resuming, which rebuilds the checkpoint's model); like an ``init_from`` model, its quantized layers
    (and its config) are switched to ``config.rounding`` first. ``data`` (optional) replaces
    :func:`load_data`.
    The result has ``test_accuracy``, ``test_loss``, ``val_accuracy``, ``val_loss``,
    ``average_bits``, ``bytes`` (the estimate of :func:`model_bytes`), ``weight_bytes``, ``model``,
    ``history`` (train/eval/check records), ``preservation`` (indices into ``data.train``),
    ``steps``, ``seconds``, ``out_dir`` and ``file_bytes`` (the size of ``model.sgsc``, or None).
    With ``out_dir`` set it writes ``metrics.jsonl``, ``checkpoint.pt`` (also every
    ``checkpoint_every`` steps), the packed model ``model.sgsc``, ``preservation.json`` and PNG
    plots there, on rank 0.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    created_group, device = _setup_distributed(config)
    try:
        return _run(config, model, data, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _run(config: TrainConfig, model, data, device) -> dict:
    rank, world = _rank_world()
    out = Path(config.out_dir) if config.out_dir else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    resumed = None
    if config.resume:
        resumed = load_checkpoint(out / CHECKPOINT)
        _check_resumable(config, resumed["config"], out / CHECKPOINT)
        if resumed["world_size"] != world:
            raise ValueError(f"resume: the checkpoint was written by {resumed['world_size']} processes, this run has "
                             f"{world}; the data order depends on it")
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    data = data if data is not None else load_data(config)
    if config.batch_size * world > len(data.train):
        raise ValueError(
            f"batch_size {config.batch_size} x {world} processes exceeds the {len(data.train)} training examples"
        )
    model = _load_model(config, data, model, resumed, device)
    optimizer = make_optimizer(model, config)
    state = _initial_state()
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer_state"])
        state = resumed["state"]
        _set_rng_state(resumed["rng"])
    log = _Log(state["history"], out if rank == 0 else None)
    preserved = _subset(data.train, state["preservation"])
    wrapped = _wrap(model, device)
    model.train()
    started = time.perf_counter()
    show = config.progress and rank == 0
    bar = tqdm(total=config.steps, initial=state["step"], disable=not show, dynamic_ncols=True)
    while state["step"] < config.steps:
        if state["step"] == config.warmup_steps and state["snapshot"] is None:
            _start_compression(model, config, data, state)
            preserved = _subset(data.train, state["preservation"])
        _set_learning_rates(optimizer, config, state["step"])
        record = _train_step(model, wrapped, optimizer, config, data, preserved, state, device)
        state["step"] += 1
        step = state["step"]
        if state["snapshot"] is not None and step % config.k == 0:
            decision = _from_rank0(lambda: decide(model, config, state, preserved, data.language))
            event = apply_decision(model, optimizer, state, decision, data.language)
            log(event)
            if event.get("pruned"):
                wrapped = _wrap(model, device)  # DDP holds the old Parameters
        if step % config.eval_every == 0:
            log({"kind": "train", "step": step, **record})
            if rank == 0:
                evaluation = _eval_record(model, data, step)
                log(evaluation)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{evaluation['test_accuracy']:.3f}",
                                bits=f"{evaluation['bits']:.2f}", bytes=evaluation["bytes"])
        if out is not None and rank == 0 and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(out / CHECKPOINT, model, optimizer, state, config)
        bar.update(1)
    bar.close()
    return _finish(config, model, optimizer, data, state, log, out, rank, time.perf_counter() - started)


def _finish(config, model, optimizer, data: Data, state: dict, log: _Log, out: Path | None, rank: int, seconds) -> dict:
    final = _eval_record(model, data, state["step"])
    if out is not None and rank == 0:
        save_checkpoint(out / CHECKPOINT, model, optimizer, state, config)
    if state["step"] % config.eval_every:
        # logged after the checkpoint: a run resumed from it must not see a record its
        # uninterrupted twin never wrote
        log(final)
    file_bytes = None
    if out is not None and rank == 0:
        packed = export.export_packed(model, out / PACKED, data={"name": config.data, "dir": config.data_dir, "seed": config.seed})
        file_bytes = packed.file_bytes
        if state["preservation"]:
            preservation.save(state["preservation"], out / "preservation.json", dataset_size=len(data.train))
        if config.plots:
            from sgsc import plots

            plots.save_all(model, state["history"], out)
    return {
        **{k: final[k] for k in ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "bytes", "weight_bytes")},
        "average_bits": final["bits"],
        "model": model,
        "history": state["history"],
        "preservation": state["preservation"],
        "steps": state["step"],
        "seconds": seconds,
        "out_dir": str(out) if out is not None else None,
        "file_bytes": file_bytes,
    }
