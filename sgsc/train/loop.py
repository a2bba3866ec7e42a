"""Safety-guided self-compression: the one training loop (Algorithm 1) every run goes through.

:func:`compress` runs SGSC on any quantized model and any data set::

    model = sgsc.quantize_model(my_model)
    result = sgsc.compress(model, (x, y), preserve=0.05, steps=2000, gamma=0.02, max_drop=0.01)

Each step minimises (:meth:`~sgsc.train.selfcompress.SelfCompression.objective`)::

    loss = task_loss + lambda_ * preservation + gamma * average_bits(model) + alpha * mean|w|

with the training and preservation batches through the model as one batch (DDP allows one forward
per backward, so BatchNorm statistics see both). With safety on, a ``guard_fraction`` of the
training data is held out first as the guard set (no batch and no loss term sees it) unless
``guard=`` is given; every ``k`` steps :class:`~sgsc.train.selfcompress.SelfCompression` compares the
model with the reference on it, and the model returned is the last state within ``max_drop``.
Before ``warmup_steps`` the task loss trains alone; then a ``preserve`` fraction is chosen with the
warmed-up model (:func:`sgsc.train.preservation.build`), and that model is the reference.

The batch of step ``s`` is a pure function of ``(seed, s, rank)`` (:mod:`sgsc.train.batches`), so a
checkpoint (:mod:`sgsc.train.checkpoint`) continues a run bit for bit. Under ``torchrun`` the loop
runs DistributedDataParallel (:mod:`sgsc.train.distributed`). What ``compress`` is given is read in
:mod:`sgsc.train.compress_inputs`; the history reaches ``metrics.jsonl`` through :mod:`sgsc.train.metrics_log`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from sgsc._deps import require
from sgsc.nn import average_bits
from sgsc.nn.replay import cut_to_shapes
from sgsc.nn.size import estimated_file_bytes
from sgsc.train import preservation
from sgsc.train.arguments import Metric, check_task_data, metric_of, quantized_model, tensor_pairs
from sgsc.train.batches import batch, batch_indices, subset
from sgsc.train.checkpoint import (
    CHECKPOINT,
    check_settings,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    warn_if_numerics_differ,
)
from sgsc.train.compress_inputs import _config, _Data, _eval_sets, _Preserve, _preserve, _split, _Task, guard_split
from sgsc.train.config import CompressConfig
from sgsc.train.distributed import from_rank0, rank_world, setup_distributed, wrap_ddp
from sgsc.train.metrics_log import _Log
from sgsc.train.pruners import Pruner
from sgsc.train.safety import RunState
from sgsc.train.selfcompress import SelfCompression, param_groups
from sgsc.train.task import evaluate, mean_loss
from sgsc.train.task import task_loss as cross_entropy

__all__ = ["PRESERVATION_FILE", "TERM_NAMES", "CompressResult", "compress", "guard_split", "lr_factor"]

PRESERVATION_FILE = "preservation.json"


@dataclass
class CompressResult:
    """What :func:`compress` returns.

    ``scores``: the final ``<set>_loss`` / ``<set>_accuracy`` of every ``eval_data`` set;
    ``average_bits``, ``bytes`` (the estimated file) and ``weight_bytes`` (its codes) of the model
    returned; ``preservation`` and ``guard``: indices into ``train_data`` (``guard`` None when it was
    given or there was none); ``contract``: the final guard record (:meth:`SelfCompression.finish`),
    None without a contract; ``file_bytes``: the packed file the zoo trainer wrote, if any.
    """

    model: nn.Module
    history: list[dict]
    scores: dict[str, float]
    average_bits: float
    bytes: int
    weight_bytes: int
    steps: int
    seconds: float
    preservation: list[int]
    guard: list[int] | None
    contract: dict | None
    out_dir: str | None
    file_bytes: int | None = None


def lr_factor(config: CompressConfig, step: int) -> float:
    """The multiplier of every group's learning rate at ``step`` (0-based) of ``config.steps``."""
    if config.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


def _set_learning_rates(optimizer: torch.optim.Optimizer, config: CompressConfig, step: int) -> None:
    base = {"weights": config.lr, "quantizers": config.quant_lr, "bits": config.quant_lr,
            "exponents": config.quant_lr if config.exponent_lr is None else config.exponent_lr}
    factor = lr_factor(config, step)
    for group in optimizer.param_groups:
        group["lr"] = base[group["name"]] * factor


# ---- the loop -----------------------------------------------------------------------------------


def _self_compression(model, data: _Data, preserved: TensorDataset | None, config: CompressConfig,
                      task: _Task) -> SelfCompression:
    return SelfCompression(model, preserved, guard=data.guard, config=config, task_loss=task.loss,
                           metric=task.metric, higher_is_better=task.higher_is_better, pruner=task.pruner)


def _preserved(data: _Data, spec: _Preserve, state: RunState) -> TensorDataset | None:
    return spec.dataset if spec.dataset is not None else subset(data.train, state.preservation)


def _start_compression(model, data: _Data, spec: _Preserve, config: CompressConfig, task: _Task,
                       state: RunState) -> SelfCompression:
    """Choose the preservation set with the current model (from the examples training may see), then
    take the reference; the checks carry the run's step and history."""
    if spec.fraction is not None:
        # outputs that are not class scores (float targets: a regression, a reconstruction) are scored by loss
        by_loss = task.loss if data.fit.tensors[1].is_floating_point() else None
        chosen = from_rank0(lambda: preservation.build(
            model, data.fit, spec.fraction, config.preservation_weights, method=config.preservation_method,
            seed=config.seed, task_loss=by_loss, pool=config.preservation_pool).tolist())
        state.preservation = data.fit_index[chosen].tolist()
    else:
        state.preservation = spec.indices or []
    comp = _self_compression(model, data, _preserved(data, spec, state), config, task)
    comp.state.step, comp.state.history = state.step, state.history
    if comp.state.passed is not None:  # the reference is the model of this step
        comp.state.passed["step"] = state.step
    comp.state.preservation, comp.state.guard = state.preservation, state.guard
    return comp


TERM_NAMES = {"preservation": "preservation_loss", "size": "size", "l1": "l1"}  # SelfCompression.terms -> log keys


def _train_step(wrapped, optimizer, comp: SelfCompression | None, data: _Data, config: CompressConfig, loss_fn,
                step: int, device) -> dict:
    rank, world = rank_world()
    pick = batch_indices(len(data.fit), config.batch_size, step, config.seed, rank, world)
    x, y = batch(data.fit, pick, device)
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
    terms = comp.terms if comp is not None else {}
    _stop_if_not_finite(loss, optimizer, step, data.fit_index[pick], task_loss, terms)
    optimizer.step()
    return {"loss": float(loss.detach()), "task_loss": float(task_loss.detach()),
            **{TERM_NAMES[name]: float(value) for name, value in terms.items()}}


def _stop_if_not_finite(loss, optimizer, step: int, examples: torch.Tensor, task_loss, terms: dict) -> None:
    """Raise before the optimiser step when the loss or a gradient is NaN or Inf (every rank alike), so the
    weights, the log and the last checkpoint keep the last good state."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([0.0 if finite else 1.0], device=loss.device)
        dist.all_reduce(flag)
        finite = float(flag) == 0
    if finite:
        return
    parts = ", ".join(f"{name} {float(value):.4g}" for name, value in {"task": task_loss, **terms}.items())
    shown = examples[:8].tolist()
    raise FloatingPointError(
        f"step {step}: the loss is {float(loss):.4g} ({parts}) or a gradient is not finite, on the batch of "
        f"train_data examples {shown}{' ...' if len(examples) > 8 else ''}; nothing of this step was applied "
        "and the last checkpoint is as it was (lower lr or quant_lr, or check these examples)")


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


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loop(model: nn.Module, data: _Data, spec: _Preserve, config: CompressConfig, task: _Task, record: dict,
          out: Path | None, resume: bool, device) -> CompressResult:
    rank, world = rank_world()
    if config.batch_size * world > len(data.fit):
        raise ValueError(f"batch_size {config.batch_size} x {world} processes exceeds the {len(data.fit)} training "
                         "examples" + (" left after the guard split" if data.guard_index else ""))
    resumed = _read_checkpoint(out, record, world) if resume else None
    if resumed is not None and resumed.get("continuation") is not None:  # a run that ended: go on from before its end
        resumed = {**resumed, **resumed["continuation"]}
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _seed(config.seed)
    model.to(device)
    if resumed is not None:  # before the optimizer: the model may be cut to the checkpoint's shapes
        _load_model_state(model, resumed["model_state"])
    optimizer = torch.optim.Adam(param_groups(model, config.lr, config.quant_lr, config.exponent_lr))
    state, comp = RunState(guard=data.guard_index), None
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer_state"])
        state = RunState.from_record(resumed["state"])
        set_rng_state(resumed["rng"])
        if state.snapshot is not None:  # compression had started: the checks continue where they were
            comp = _self_compression(model, data, _preserved(data, spec, state), config, task)
            comp.load_state_dict({"state": resumed["state"], "teacher": resumed.get("teacher")})
            state = comp.state
            if comp.policy.max_drop is not None and comp.policy.restore and state.reference is None:
                raise ValueError(f"resume: {out / CHECKPOINT} was written before sgsc's guard contract, so it holds "
                                 "no reference to check against; start the run again")
    log = _Log(state.history, out if rank == 0 else None)
    loss_fn = task.loss if task.loss is not None else cross_entropy
    wrapped = wrap_ddp(model, device)
    model.train()
    started = time.perf_counter()
    bar = require("tqdm", "train").tqdm(total=config.steps, initial=state.step,
                                        disable=not (config.progress and rank == 0), dynamic_ncols=True)
    while state.step < config.steps:
        if comp is None and state.step == config.warmup_steps:
            comp = _start_compression(model, data, spec, config, task, state)
            state = comp.state
            if rank == 0 and state.step and state.step % config.eval_every:  # the reference's own scores
                log.append(_eval_record(model, data.eval_sets, task, state.step))
        _set_learning_rates(optimizer, config, state.step)
        step_record = _train_step(wrapped, optimizer, comp, data, config, loss_fn, state.step, device)
        if comp is None:
            state.step += 1
        elif (event := comp.step(optimizer)) is not None and (event.get("pruned") or "rolled_back_to" in event):
            wrapped = wrap_ddp(model, device)  # DDP holds the old Parameters
        step = state.step
        if step % config.eval_every == 0:
            log.append({"kind": "train", "step": step, **step_record})
            if rank == 0:
                evaluation = _eval_record(model, data.eval_sets, task, step)
                log.append(evaluation)
                bar.set_postfix(_postfix(step_record, evaluation))
        log.sync()
        if out is not None and rank == 0 and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(out / CHECKPOINT, model, optimizer, state, record, teacher=_teacher(comp))
        bar.update(1)
    bar.close()
    continuation = _continuation(model, optimizer, state) if out is not None and rank == 0 else None
    contract = comp.finish(optimizer) if comp is not None else None
    if comp is not None:
        comp.close()  # the hook on the caller's model that recorded training inputs for the pruner
    log.sync()
    seconds = time.perf_counter() - started
    final = _eval_record(model, data.eval_sets, task, state.step)
    rolled_back = contract is not None and contract["returned_step"] != state.step
    if rolled_back:  # the scores of the state the run returns, not of the last one it trained
        final["returned_step"] = contract["returned_step"]
    if out is not None and rank == 0:
        save_checkpoint(out / CHECKPOINT, model, optimizer, state, record, teacher=_teacher(comp),
                        continuation=continuation)
        if state.preservation:
            preservation.save(state.preservation, out / PRESERVATION_FILE, dataset_size=len(data.train))
    if state.step % config.eval_every or rolled_back:
        # logged after the checkpoint: a run resumed from it must not see a record its
        # uninterrupted twin never wrote
        log.append(final)
    scores = {key: value for key, value in final.items() if key not in ("kind", "step", "bits", "bytes",
                                                                          "weight_bytes")}
    return CompressResult(model=model, history=state.history, scores=scores, average_bits=final["bits"],
                          bytes=final["bytes"], weight_bytes=final["weight_bytes"], steps=state.step, seconds=seconds,
                          preservation=state.preservation or [], guard=state.guard, contract=contract,
                          out_dir=str(out) if out is not None else None)


def _continuation(model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> dict:
    """The training state before :meth:`SelfCompression.finish` (which may roll the model back): what a
    resume that trains on continues from, so it goes on as the uninterrupted run would have."""
    record = state.to_record()
    return {"model_state": {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()},
            "optimizer_state": copy.deepcopy(optimizer.state_dict()),
            "state": {**record, "history": list(record["history"]), "pace": dict(record["pace"])}}


def _teacher(comp: SelfCompression | None) -> torch.Tensor | None:
    return None if comp is None else comp.teacher


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
    config: CompressConfig | None = None,
    *,
    preserve=None,
    guard=None,
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    metric: str | Metric = "accuracy",
    higher_is_better: bool | None = None,
    eval_data=None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    pruner: Pruner | None = None,
    run_config: dict | None = None,
    **hyper,
) -> CompressResult:
    """Safety-guided self-compression of a quantized ``model`` on ``train_data``; returns a :class:`CompressResult`.

    ``model`` has quantized layers (:func:`sgsc.quantize_model`, or a zoo model) and is trained in place.
    ``train_data`` is a Dataset (or DataLoader) of ``(input, target)`` pairs or an ``(inputs, targets)``
    pair of tensors, read into memory once. The hyper-parameters are :class:`~sgsc.CompressConfig`'s,
    given as ``config`` and/or keywords (``steps=2000, gamma=0.02, max_drop=0.005, ...``).

    Safety: ``preserve`` is what the preservation term trains on: a fraction of the training data
    chosen after ``warmup_steps`` by :func:`sgsc.train.preservation.build` (``preservation_method``,
    ``preservation_weights``), indices into ``train_data``, a set of its own (as ``train_data``), or
    None. ``guard`` is data no step trains on, checked every ``k`` steps against the reference (the
    model as compression starts); with ``restore`` (the default) and any of ``preserve``, ``guard``
    or ``max_drop`` given, and no ``guard``, ``guard_fraction`` of ``train_data`` is held out as the
    guard. The model returned is then the last state within ``max_drop`` of the reference on the
    guard at ``confidence`` (the reference itself when no compressed state was), and
    ``result.contract`` says which. Nothing given: unsafe self-compression.

    ``task_loss``, ``metric``, ``higher_is_better`` and ``pruner`` mean what they mean to
    :class:`SelfCompression`. Every ``eval_every`` steps the history gets a ``train`` record (loss
    and its terms) and, on rank 0, an ``eval`` record: bits per weight, estimated file bytes and, for
    each set of ``eval_data`` (one set, named ``val``, or a dict of named sets), ``<name>_loss`` and
    ``<name>_accuracy`` (accuracy unless a custom ``task_loss`` is scored by loss). Checks add
    ``check`` records, the end a ``final`` one. With ``out_dir`` set, rank 0 writes ``metrics.jsonl``
    (the history), ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end) and
    ``preservation.json`` (indices into ``train_data``); ``resume=True`` continues that checkpoint bit
    for bit, given the same model (shapes as checkpointed), data and callables. ``run_config`` (plain
    values) is stored with the settings in the checkpoint and checked on resume. A NaN or Inf loss or
    gradient stops the run with a ``FloatingPointError`` naming the step and the batch, before
    anything of that step is applied or written. Under ``torchrun`` every process calls this and the
    run is DistributedDataParallel (``batch_size`` per process). Bad arguments raise before anything
    is trained or written, naming the argument.
    """
    quantized_model(model)
    config = _config(config, hyper)
    if task_loss is not None and not callable(task_loss):
        raise TypeError(f"task_loss must be a callable (outputs, targets) -> loss, got {type(task_loss).__name__}")
    metric_of(metric, higher_is_better, task_loss)  # checks metric and higher_is_better
    if pruner is not None and not isinstance(pruner, Pruner):
        raise TypeError(f"pruner must be an sgsc.train.pruners.Pruner or None, got {type(pruner).__name__}")
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
    if resume and out_dir is None:
        raise ValueError("resume needs out_dir, the directory holding the run's checkpoint")
    if run_config is not None and not isinstance(run_config, dict):
        raise TypeError(f"run_config must be a dict or None, got {type(run_config).__name__}")
    train = tensor_pairs("train_data", train_data)
    if len(train) == 0:
        raise ValueError("train_data is empty")
    spec = _preserve(preserve, train)
    wants_guard = config.restore and (spec.given or config.max_drop is not None)
    data = _split(train, guard, wants_guard, config, _eval_sets(eval_data), spec.indices)
    check_task_data(model, {"train_data": data.train, **({"guard": data.guard} if guard is not None else {}),
                            **{f"eval_data[{name!r}]": value for name, value in data.eval_sets.items()}}, task_loss)
    task = _Task(task_loss, metric, higher_is_better, pruner)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__qualname__", type(metric).__name__)
    record = {**dataclasses.asdict(config), "preserve": spec.describe(), "metric": metric_name,
              "guard": "given" if guard is not None else None, **(run_config or {})}
    created, device = setup_distributed(config.device)
    try:
        return _loop(model, data, spec, config, task, record, Path(out_dir) if out_dir is not None else None,
                     resume, device)
    finally:
        if created:
            torch.distributed.destroy_process_group()
