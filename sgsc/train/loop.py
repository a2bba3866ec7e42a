"""Safety-guided self-compression: the one training loop (Algorithm 1), and the zoo's client of it.

:func:`compress` runs SGSC on any quantized model and any data set::

    model = sgsc.quantize_model(my_model)
    result = sgsc.compress(model, (x, y), preserve=0.05, steps=2000, gamma=0.02, eval_data=(x_val, y_val))

Each step minimises (:meth:`~sgsc.train.selfcompress.SelfCompression.objective`)::

    loss = task_loss + lambda_ * preservation_loss + gamma * average_bits(model) + alpha * mean|w|

with the training and preservation batches through the model as one batch (DDP allows one forward
per backward, so BatchNorm statistics see both). Every ``k`` steps
:class:`~sgsc.train.selfcompress.SelfCompression` restores or prunes. Before ``warmup_steps`` the
task loss trains alone; then a ``preserve`` fraction is chosen with the warmed-up model
(:func:`sgsc.train.preservation.build`).

The batch of step ``s`` is a pure function of ``(seed, s, rank)`` (:mod:`sgsc.train.batches`), so a
checkpoint (:mod:`sgsc.train.checkpoint`) continues a run bit for bit. Under ``torchrun`` the loop
runs DistributedDataParallel (:mod:`sgsc.train.distributed`).

:func:`train` is the zoo trainer (``sgsc train``/``sgsc compress``): it reads a ``TrainConfig``,
loads the zoo's data and model, calls :func:`compress`, then writes the packed file and plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sgsc import export
from sgsc._deps import require
from sgsc._io import atomic_write
from sgsc.nn import average_bits, quantized_layers
from sgsc.nn.replay import cut_to_shapes
from sgsc.nn.size import estimated_file_bytes
from sgsc.nn.zoo import model_name
from sgsc.train import preservation
from sgsc.train.arguments import Metric, flag, integer, metric_of, number, quantized_model, tensor_pairs
from sgsc.train.batches import batch, batch_indices, subset
from sgsc.train.checkpoint import (
    CHECKPOINT,
    check_resumable,
    check_settings,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    set_rng_state,
    warn_if_numerics_differ,
)
from sgsc.train.config import LR_SCHEDULES, TrainConfig
from sgsc.train.distributed import from_rank0, rank_world, setup_distributed, wrap_ddp
from sgsc.train.safety import Pruner, RunState
from sgsc.train.selfcompress import SelfCompression, param_groups
from sgsc.train.task import Data, evaluate, load_data, mean_loss, new_model
from sgsc.train.task import task_loss as cross_entropy

METRICS_FILE = "metrics.jsonl"
PACKED = "model.sgsc"
PRESERVATION_FILE = "preservation.json"
DEVICES = ("auto", "cpu", "cuda")


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over :func:`~sgsc.train.selfcompress.param_groups`: weights at ``lr``, bits and exponents at
    ``quant_lr`` (one group, "quantizers", unless ``exponent_lr`` is set), as earlier checkpoints saved it."""
    return torch.optim.Adam(param_groups(model, config.lr, config.quant_lr, config.exponent_lr))


# ---- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """:func:`compress`'s plain-valued arguments, checked; a checkpoint records them for resume."""

    steps: int
    gamma: float
    batch_size: int
    lr: float
    alpha: float
    lambda_: float
    k: int
    threshold: float
    restore: bool
    prune: bool
    quant_lr: float
    exponent_lr: float | None
    lr_schedule: str
    warmup_steps: int
    preserve: float | str | None  # the fraction, or what was given ("45 indices", "a set of 45")
    preservation_method: str
    preservation_weights: tuple[float, ...]
    preservation_batch: int
    metric: str  # a callable's qualified name
    eval_every: int
    checkpoint_every: int
    out_dir: str | None
    resume: bool
    seed: int
    progress: bool
    device: str

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps", "checkpoint_every", "seed"):
            integer(name, getattr(self, name), low=0)
        for name in ("batch_size", "k", "preservation_batch", "eval_every"):
            integer(name, getattr(self, name), low=1)
        for name in ("gamma", "alpha", "lambda_", "threshold"):
            number(name, getattr(self, name), low=0)
        for name in ("lr", "quant_lr"):
            number(name, getattr(self, name), low=0, strict=True)
        if self.exponent_lr is not None:
            number("exponent_lr", self.exponent_lr, low=0, strict=True)
        for name in ("restore", "prune", "resume", "progress"):
            flag(name, getattr(self, name))
        for name, value, allowed in (("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("preservation_method", self.preservation_method, preservation.METHODS),
                                     ("device", self.device, DEVICES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        try:
            preservation.normalize_weights(self.preservation_weights)
        except ValueError as exc:
            raise ValueError(f"preservation_weights: {exc}") from None
        if self.resume and self.out_dir is None:
            raise ValueError("resume needs out_dir, the directory holding the run's checkpoint")


def lr_factor(settings: Settings | TrainConfig, step: int) -> float:
    """The multiplier of every group's learning rate at ``step`` (0-based) of ``settings.steps``."""
    if settings.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / settings.steps))


def _set_learning_rates(optimizer: torch.optim.Optimizer, settings: Settings, step: int) -> None:
    base = {"weights": settings.lr, "quantizers": settings.quant_lr, "bits": settings.quant_lr,
            "exponents": settings.quant_lr if settings.exponent_lr is None else settings.exponent_lr}
    factor = lr_factor(settings, step)
    for group in optimizer.param_groups:
        group["lr"] = base[group["name"]] * factor


# ---- what compress was given ------------------------------------------------------------------


@dataclass(frozen=True)
class _Preserve:
    """``preserve`` read: a fraction to choose after the warm-up, indices into the training data, a set of
    its own, or nothing (unsafe)."""

    fraction: float | None = None
    indices: list[int] | None = None
    dataset: TensorDataset | None = None

    def describe(self) -> float | str | None:
        if self.indices is not None:
            return f"{len(self.indices)} indices"
        if self.dataset is not None:
            return f"a set of {len(self.dataset)}"
        return self.fraction


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


# ---- the loop -----------------------------------------------------------------------------------


def _self_compression(model: nn.Module, preserved: TensorDataset | None, s: Settings, task: _Task) -> SelfCompression:
    return SelfCompression(
        model, preserved, gamma=s.gamma, alpha=s.alpha, lambda_=s.lambda_, k=s.k, threshold=s.threshold,
        restore=s.restore, prune=s.prune, quant_lr=s.quant_lr, exponent_lr=s.exponent_lr, task_loss=task.loss,
        metric=task.metric, higher_is_better=task.higher_is_better, preservation_batch=s.preservation_batch,
        seed=s.seed, pruner=task.pruner,
    )


def _preserved(train: TensorDataset, spec: _Preserve, state: RunState) -> TensorDataset | None:
    return spec.dataset if spec.dataset is not None else subset(train, state.preservation)


def _start_compression(model, train: TensorDataset, spec: _Preserve, s: Settings, task: _Task,
                       state: RunState) -> SelfCompression:
    """Choose the preservation set with the current model; the checks then carry the run's step and history."""
    if spec.fraction is not None:
        state.preservation = from_rank0(lambda: preservation.build(
            model, train, spec.fraction, s.preservation_weights, method=s.preservation_method, seed=s.seed,
        ).tolist())
    else:
        state.preservation = spec.indices or []
    comp = _self_compression(model, _preserved(train, spec, state), s, task)  # takes the first safety reference
    comp.load_state_dict({"state": {**state.to_record(), "best": comp.state.best, "snapshot": comp.state.snapshot}})
    return comp


TERM_NAMES = {"preservation": "preservation_loss", "size": "size", "l1": "l1"}  # SelfCompression.terms -> log keys


def _train_step(model, wrapped, optimizer, comp: SelfCompression | None, train: TensorDataset, s: Settings,
                loss_fn, step: int, device) -> dict:
    rank, world = rank_world()
    x, y = batch(train, batch_indices(len(train), s.batch_size, step, s.seed, rank, world), device)
    n_task = len(x)
    extra = comp.preservation_inputs() if comp is not None else None
    if extra is not None:
        # one forward over both batches: DDP allows one forward per backward
        x, y = torch.cat([x, extra[0]]), torch.cat([y, extra[1]])
    output = wrapped(x)
    task_loss = loss_fn(output[:n_task], y[:n_task])
    loss = task_loss if comp is None else comp.objective(task_loss, None if extra is None else output[n_task:])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    terms = comp.terms if comp is not None else {}
    return {"loss": float(loss.detach()), "task_loss": float(task_loss.detach()),
            **{TERM_NAMES[name]: float(value) for name, value in terms.items()}}


def _scores(model: nn.Module, data: TensorDataset, task: _Task) -> dict:
    """One eval set's numbers: the task loss, and accuracy unless a custom loss is scored otherwise."""
    if task.loss is None:
        return evaluate(model, data)
    scores = {"loss": mean_loss(model, data, task.loss)}
    if task.metric == "accuracy":
        scores["accuracy"] = evaluate(model, data)["accuracy"]
    return scores


def _eval_record(model: nn.Module, eval_sets: dict[str, TensorDataset], task: _Task, step: int) -> dict:
    scores = {f"{name}_{key}": value for name, data in eval_sets.items()
              for key, value in _scores(model, data, task).items()}
    bits = float(average_bits(model).detach())
    return {"kind": "eval", "step": step, **scores, "bits": bits, **estimated_file_bytes(model)}


class _Log:
    """The history (kept in the checkpoint) mirrored to ``metrics.jsonl`` on rank 0.

    Records reach the history from the loop (:meth:`append`) and from the safety checks
    (:meth:`SelfCompression.step`); :meth:`sync` writes whatever the file lacks, in order.
    """

    def __init__(self, history: list, out: Path | None) -> None:
        self.history, self.path, self.written = history, (out / METRICS_FILE if out else None), len(history)
        if self.path is not None:  # on resume, drop whatever the interrupted run logged after its checkpoint
            atomic_write(self.path, lambda h: h.write("".join(json.dumps(r) + "\n" for r in history).encode()))

    def append(self, record: dict) -> None:
        self.history.append(record)
        self.sync()

    def sync(self) -> None:
        if self.path is not None and self.written < len(self.history):
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(r) + "\n" for r in self.history[self.written:]))
        self.written = len(self.history)


def _read_checkpoint(out: Path, config: dict, world: int) -> dict:
    resumed = load_checkpoint(out / CHECKPOINT)
    check_settings(config, resumed["config"], out / CHECKPOINT)
    warn_if_numerics_differ(resumed, out / CHECKPOINT)
    if resumed["world_size"] != world:
        raise ValueError(f"resume: the checkpoint was written by {resumed['world_size']} processes, this run has "
                         f"{world}; the data order depends on it")
    return resumed


def _load_model_state(model: nn.Module, saved: dict) -> None:
    """Load the checkpoint's model state; a run that pruned saved smaller tensors, so the model (as the
    caller built it) is first cut to their shapes, as a packed file's loader does."""
    cut_to_shapes(model, {key: tuple(value.shape) for key, value in saved.items()})
    mine = model.state_dict()
    differ = sorted(set(saved) ^ set(mine)) + [k for k in saved if k in mine and saved[k].shape != mine[k].shape]
    if differ:
        raise ValueError(f"resume: model does not fit the checkpoint's state ({', '.join(differ[:4])}"
                         f"{' ...' if len(differ) > 4 else ''}); pass a model of the checkpointed run's shapes")
    model.load_state_dict(saved)


def _loop(model: nn.Module, train: TensorDataset, eval_sets: dict, spec: _Preserve, s: Settings, task: _Task,
          config: dict, device) -> dict:
    rank, world = rank_world()
    if s.batch_size * world > len(train):
        raise ValueError(f"batch_size {s.batch_size} x {world} processes exceeds the {len(train)} training examples")
    out = Path(s.out_dir) if s.out_dir else None
    resumed = _read_checkpoint(out, config, world) if s.resume else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    model.to(device)
    if resumed is not None:  # before the optimizer: the model may be cut to the checkpoint's shapes
        _load_model_state(model, resumed["model_state"])
    optimizer = torch.optim.Adam(param_groups(model, s.lr, s.quant_lr, s.exponent_lr))
    state, comp = RunState(), None
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer_state"])
        state = RunState.from_record(resumed["state"])
        set_rng_state(resumed["rng"])
        if state.snapshot is not None:  # compression had started: the checks continue where they were
            comp = _self_compression(model, _preserved(train, spec, state), s, task)
            comp.load_state_dict({"state": state.to_record()})
            state = comp.state
    log = _Log(state.history, out if rank == 0 else None)
    loss_fn = task.loss if task.loss is not None else cross_entropy
    wrapped = wrap_ddp(model, device)
    model.train()
    started = time.perf_counter()
    bar = require("tqdm", "train").tqdm(total=s.steps, initial=state.step, disable=not (s.progress and rank == 0),
                                        dynamic_ncols=True)
    while state.step < s.steps:
        if comp is None and state.step == s.warmup_steps:
            comp = _start_compression(model, train, spec, s, task, state)
            state = comp.state
        _set_learning_rates(optimizer, s, state.step)
        record = _train_step(model, wrapped, optimizer, comp, train, s, loss_fn, state.step, device)
        if comp is None:
            state.step += 1
        elif (event := comp.step(optimizer)) is not None and event.get("pruned"):
            wrapped = wrap_ddp(model, device)  # DDP holds the old Parameters
        step = state.step
        if step % s.eval_every == 0:
            log.append({"kind": "train", "step": step, **record})
            if rank == 0:
                evaluation = _eval_record(model, eval_sets, task, step)
                log.append(evaluation)
                bar.set_postfix(_postfix(record, evaluation))
        log.sync()
        if out is not None and rank == 0 and s.checkpoint_every and step % s.checkpoint_every == 0:
            save_checkpoint(out / CHECKPOINT, model, optimizer, state, config)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    final = _eval_record(model, eval_sets, task, state.step)
    if out is not None and rank == 0:
        save_checkpoint(out / CHECKPOINT, model, optimizer, state, config)
        if state.preservation:
            preservation.save(state.preservation, out / PRESERVATION_FILE, dataset_size=len(train))
    if state.step % s.eval_every:
        # logged after the checkpoint: a run resumed from it must not see a record its
        # uninterrupted twin never wrote
        log.append(final)
    scores = {key: value for key, value in final.items() if key not in ("kind", "step", "bits")}
    return {**scores, "average_bits": final["bits"], "model": model, "history": state.history,
            "preservation": state.preservation, "steps": state.step, "seconds": seconds,
            "out_dir": str(out) if out is not None else None}


def _postfix(record: dict, evaluation: dict) -> dict:
    shown = {"loss": f"{record['loss']:.3f}"}
    accuracies = [key for key in evaluation if key.endswith("_accuracy")]
    if accuracies:
        shown["acc"] = f"{evaluation[accuracies[-1]]:.3f}"
    return {**shown, "bits": f"{evaluation['bits']:.2f}", "est_bytes": evaluation["bytes"]}


# ---- the one call ---------------------------------------------------------------------------------


def compress(
    model: nn.Module,
    train_data,
    *,
    preserve=None,
    steps: int,
    gamma: float,
    batch_size: int = 64,
    lr: float = 1e-3,
    alpha: float = 0.0,
    lambda_: float = 1.0,
    k: int = 50,
    threshold: float = 0.02,
    restore: bool = True,
    prune: bool = True,
    quant_lr: float = 0.05,
    exponent_lr: float | None = None,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    metric: str | Metric = "accuracy",
    higher_is_better: bool | None = None,
    eval_data=None,
    eval_every: int = 100,
    out_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    pruner: Pruner | None = None,
    preservation_batch: int = 32,
    preservation_method: str = "criteria",
    preservation_weights: Sequence[float] = (1.0, 1.0, 1.0),
    device: str = "auto",
    run_config: dict | None = None,
) -> dict:
    """Safety-guided self-compression of a quantized ``model`` on ``train_data``; returns the model and its history.

    ``model`` has quantized layers (:func:`sgsc.quantize_model`, or a zoo model) and is trained in place.
    ``train_data`` is a Dataset (or DataLoader) of ``(input, target)`` pairs or an ``(inputs, targets)``
    pair of tensors, read into memory once: step ``s`` trains on the batch of ``(seed, s, rank)``.
    ``preserve`` is the preservation set: a fraction of ``train_data`` chosen after ``warmup_steps`` by
    :func:`sgsc.train.preservation.build` (``preservation_method``, ``preservation_weights``), indices
    into ``train_data``, a set of its own (as ``train_data``), or None (unsafe self-compression).
    ``gamma``, ``alpha``, ``lambda_``, ``k``, ``threshold``, ``restore``, ``prune``, ``pruner``,
    ``task_loss``, ``metric``, ``higher_is_better``, ``quant_lr``, ``exponent_lr``,
    ``preservation_batch`` and ``seed`` mean what they mean to :class:`SelfCompression`, which takes
    every restore and prune decision. ``lr`` is the weights' Adam rate; ``lr_schedule`` ``"constant"``
    or ``"cosine"`` (every group to 0 at the last step).

    Every ``eval_every`` steps the history gets a ``train`` record (loss and its terms) and, on rank 0,
    an ``eval`` record: bits per weight, estimated file bytes and, for each set of ``eval_data`` (one
    set, named ``val``, or a dict of named sets), ``<name>_loss`` and ``<name>_accuracy`` (accuracy
    unless a custom ``task_loss`` is scored by loss). Safety checks add ``check`` records.
    With ``out_dir`` set, rank 0 writes ``metrics.jsonl`` (the history), ``checkpoint.pt`` (every
    ``checkpoint_every`` steps and at the end) and ``preservation.json`` (indices into
    ``train_data``); ``resume=True`` continues that checkpoint bit for bit, given the same model
    (shapes as checkpointed), data and callables. ``run_config`` (plain values) is stored with
    the settings in the checkpoint and checked on resume: the zoo trainer records its TrainConfig.
    Under ``torchrun`` every process calls this and the run is DistributedDataParallel
    (``batch_size`` per process); ``device`` is ``"auto"``, ``"cpu"`` or ``"cuda"``.

    The result has ``model``, ``history``, ``preservation`` (indices into ``train_data``; [] when none
    was taken from it), ``steps``, ``seconds``, ``out_dir``, ``average_bits``, ``bytes``,
    ``weight_bytes`` and the final ``<name>_loss``/``<name>_accuracy``. Bad arguments raise before
    anything is trained or written, naming the argument.
    """
    quantized_model(model)
    if task_loss is not None and not callable(task_loss):
        raise TypeError(f"task_loss must be a callable (outputs, targets) -> loss, got {type(task_loss).__name__}")
    metric_of(metric, higher_is_better, task_loss)  # checks metric and higher_is_better
    if pruner is not None and not isinstance(pruner, Pruner):
        raise TypeError(f"pruner must be an sgsc.train.safety.Pruner or None, got {type(pruner).__name__}")
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
    if run_config is not None and not isinstance(run_config, dict):
        raise TypeError(f"run_config must be a dict or None, got {type(run_config).__name__}")
    train = tensor_pairs("train_data", train_data)
    if len(train) == 0:
        raise ValueError("train_data is empty")
    spec = _preserve(preserve, train)
    settings = Settings(
        steps=steps, gamma=gamma, batch_size=batch_size, lr=lr, alpha=alpha, lambda_=lambda_, k=k,
        threshold=threshold, restore=restore, prune=prune, quant_lr=quant_lr, exponent_lr=exponent_lr,
        lr_schedule=lr_schedule, warmup_steps=warmup_steps, preserve=spec.describe(),
        preservation_method=preservation_method, preservation_weights=tuple(preservation_weights),
        preservation_batch=preservation_batch, metric=metric if isinstance(metric, str) else getattr(metric, "__qualname__", type(metric).__name__),
        eval_every=eval_every, checkpoint_every=checkpoint_every, out_dir=None if out_dir is None else str(out_dir),
        resume=resume, seed=seed, progress=progress, device=device,
    )
    eval_sets = _eval_sets(eval_data)
    task = _Task(task_loss, metric, higher_is_better, pruner)
    config = {**dataclasses.asdict(settings), **(run_config or {})}
    created, device = setup_distributed(settings.device)
    try:
        return _loop(model, train, eval_sets, spec, settings, task, config, device)
    finally:
        if created:
            torch.distributed.destroy_process_group()


# ---- the zoo trainer: a client of compress -----------------------------------------------------


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
    """Train (and compress) a zoo model under ``config``: :func:`compress` on the zoo's data, then the packed file.

    ``model`` (optional) is trained in place instead of a fresh or ``init_from`` model (ignored when
    resuming, which rebuilds the checkpoint's model); like an ``init_from`` model, its quantized layers
    (and its config) are switched to ``config.rounding`` first. ``data`` (optional) replaces
    :func:`load_data`. The preservation set is ``config.fraction`` of ``data.train`` (none for the
    unsafe baseline, ``lambda_=0, restore=False``); the safety metric is accuracy, or loss for a
    language model; eval records score ``data.val`` and ``data.test``.
    The result is :func:`compress`'s (with ``test_accuracy``, ``test_loss``, ``val_accuracy``,
    ``val_loss``) and ``file_bytes`` (the size of ``model.sgsc``, or None). With ``out_dir`` set it
    writes :func:`compress`'s files (the checkpoint records ``config``), the packed model
    ``model.sgsc`` and PNG plots there, on rank 0.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    created_group, device = setup_distributed(config.device)
    try:
        return _train(config, model, data, device)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, model: nn.Module | None, data: Data | None, device) -> dict:
    out = Path(config.out_dir) if config.out_dir else None
    resumed = None
    if config.resume:
        resumed = load_checkpoint(out / CHECKPOINT)
        check_resumable(config, resumed["config"], out / CHECKPOINT)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)  # the fresh model's initialisation
    data = data if data is not None else load_data(config)
    model = _load_model(config, data, model, resumed, device)
    safe = config.lambda_ > 0 or config.restore
    result = compress(
        model, data.train, preserve=config.fraction if safe else None, steps=config.steps, gamma=config.gamma,
        batch_size=config.batch_size, lr=config.lr, alpha=config.alpha, lambda_=config.lambda_, k=config.k,
        threshold=config.threshold, restore=config.restore, prune=config.prune, quant_lr=config.quant_lr,
        exponent_lr=config.exponent_lr, lr_schedule=config.lr_schedule, warmup_steps=config.warmup_steps,
        metric="loss" if data.language else "accuracy", eval_data={"val": data.val, "test": data.test},
        eval_every=config.eval_every, out_dir=config.out_dir, checkpoint_every=config.checkpoint_every,
        resume=config.resume, seed=config.seed, progress=config.progress,
        preservation_batch=config.preservation_batch, preservation_method=config.preservation_method,
        preservation_weights=config.preservation_weights, device=config.device,
        run_config=dataclasses.asdict(config),
    )
    result["file_bytes"] = None
    if out is not None and rank_world()[0] == 0:
        packed = export.export_packed(model, out / PACKED, data={"name": config.data, "seed": config.seed})
        result["file_bytes"] = packed.file_bytes
        if config.plots:
            from sgsc.train import plots

            plots.save_all(model, result["history"], out)
    return result
