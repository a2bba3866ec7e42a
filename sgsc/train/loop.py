"""Safety-guided self-compression: the training loop (Algorithm 1), with its policies beside it.

The objective (per step, on a training batch and a preservation batch)::

    loss = task_loss + alpha * mean|w| + gamma * average_bits(model) + lambda_ * preservation_loss

``mean|w|`` is the mean absolute weight of the quantized layers and ``average_bits`` the bits per
quantized weight (the paper's size term). The training and preservation batches go through the
model as one batch (DDP allows one forward per backward), so BatchNorm statistics see both.
Every ``k`` steps :mod:`sgsc.train.safety` restores or prunes. ``lambda_=0, restore=False`` is the
unsafe self-compression baseline (:func:`~sgsc.train.config.unsafe`).

The batch of step ``s`` is a pure function of ``(seed, s, rank)`` (:mod:`sgsc.train.batches`), so a
checkpoint (:mod:`sgsc.train.checkpoint`) continues a run bit for bit. Under ``torchrun`` the loop
runs DistributedDataParallel (:mod:`sgsc.train.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sgsc import export
from sgsc._deps import require
from sgsc._io import atomic_write
from sgsc.nn import average_bits, quantized_layers
from sgsc.nn.size import estimated_file_bytes
from sgsc.nn.zoo import model_name
from sgsc.train import preservation
from sgsc.train.batches import batch, batch_indices, seeded_generator, subset
from sgsc.train.checkpoint import (
    CHECKPOINT,
    check_resumable,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from sgsc.train.config import TrainConfig
from sgsc.train.distributed import from_rank0, rank_world, setup_distributed, wrap_ddp
from sgsc.train.safety import RunState, apply_decision, bits_snapshot, decide, preservation_metric
from sgsc.train.selfcompress import param_groups
from sgsc.train.task import Data, evaluate, load_data, mean_abs_weight, new_model, task_loss

METRICS = "metrics.jsonl"
PACKED = "model.sgsc"


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over :func:`~sgsc.train.selfcompress.param_groups`: weights at ``lr``, bits and exponents at
    ``quant_lr`` (one group, "quantizers", unless ``exponent_lr`` is set), as earlier checkpoints saved it."""
    return torch.optim.Adam(param_groups(model, config.lr, config.quant_lr, config.exponent_lr))


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


def _start_compression(model, config: TrainConfig, data: Data, state: RunState) -> None:
    """Choose the preservation set with the current model and take the first safety reference."""
    if config.lambda_ > 0 or config.restore:
        selected = from_rank0(lambda: preservation.build(
            model, data.train, config.fraction, config.preservation_weights, method=config.preservation_method,
            seed=config.seed,
        ).tolist())
        state.preservation = selected
        state.best = from_rank0(lambda: preservation_metric(model, subset(data.train, selected), data.language))
    else:
        state.preservation = []
    state.snapshot = bits_snapshot(model)


def _train_step(model, wrapped, optimizer, config: TrainConfig, data: Data, preserved, step: int, device) -> dict:
    rank, world = rank_world()
    compressing = step >= config.warmup_steps
    x, y = batch(data.train, batch_indices(len(data.train), config.batch_size, step, config.seed, rank, world), device)
    n_task = len(x)
    use_preservation = compressing and config.lambda_ > 0 and preserved is not None
    if use_preservation:
        generator = seeded_generator(config.seed, step, rank, 1)
        pick = torch.randint(0, len(preserved), (config.preservation_batch,), generator=generator)
        px, py = batch(preserved, pick, device)
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
            "test_loss": test["loss"], "test_accuracy": test["accuracy"], "bits": bits, **estimated_file_bytes(model)}


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
    ``average_bits``, ``bytes`` and ``weight_bytes`` (:func:`~sgsc.nn.size.estimated_file_bytes`), ``model``,
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
    created_group, device = setup_distributed(config)
    try:
        return _run(config, model, data, device)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def _run(config: TrainConfig, model, data, device) -> dict:
    rank, world = rank_world()
    out = Path(config.out_dir) if config.out_dir else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    resumed = None
    if config.resume:
        resumed = load_checkpoint(out / CHECKPOINT)
        check_resumable(config, resumed["config"], out / CHECKPOINT)
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
    state = RunState()
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer_state"])
        state = RunState.from_record(resumed["state"])
        set_rng_state(resumed["rng"])
    log = _Log(state.history, out if rank == 0 else None)
    preserved = subset(data.train, state.preservation)
    wrapped = wrap_ddp(model, device)
    model.train()
    started = time.perf_counter()
    show = config.progress and rank == 0
    bar = require("tqdm", "train").tqdm(total=config.steps, initial=state.step, disable=not show, dynamic_ncols=True)
    while state.step < config.steps:
        if state.step == config.warmup_steps and state.snapshot is None:
            _start_compression(model, config, data, state)
            preserved = subset(data.train, state.preservation)
        _set_learning_rates(optimizer, config, state.step)
        record = _train_step(model, wrapped, optimizer, config, data, preserved, state.step, device)
        state.step += 1
        step = state.step
        if state.snapshot is not None and step % config.k == 0:
            decision = from_rank0(lambda: decide(model, config, state, preserved, data.language))
            event = apply_decision(model, optimizer, state, decision, data.language)
            log(event)
            if event.get("pruned"):
                wrapped = wrap_ddp(model, device)  # DDP holds the old Parameters
        if step % config.eval_every == 0:
            log({"kind": "train", "step": step, **record})
            if rank == 0:
                evaluation = _eval_record(model, data, step)
                log(evaluation)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{evaluation['test_accuracy']:.3f}",
                                bits=f"{evaluation['bits']:.2f}", est_bytes=evaluation["bytes"])
        if out is not None and rank == 0 and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(out / CHECKPOINT, model, optimizer, state, config)
        bar.update(1)
    bar.close()
    return _finish(config, model, optimizer, data, state, log, out, rank, time.perf_counter() - started)


def _finish(config, model, optimizer, data: Data, state: RunState, log: _Log, out: Path | None, rank: int, seconds) -> dict:
    final = _eval_record(model, data, state.step)
    if out is not None and rank == 0:
        save_checkpoint(out / CHECKPOINT, model, optimizer, state, config)
    if state.step % config.eval_every:
        # logged after the checkpoint: a run resumed from it must not see a record its
        # uninterrupted twin never wrote
        log(final)
    file_bytes = None
    if out is not None and rank == 0:
        packed = export.export_packed(model, out / PACKED, data={"name": config.data, "seed": config.seed})
        file_bytes = packed.file_bytes
        if state.preservation:
            preservation.save(state.preservation, out / "preservation.json", dataset_size=len(data.train))
        if config.plots:
            from sgsc.train import plots

            plots.save_all(model, state.history, out)
    return {
        **{k: final[k] for k in ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "bytes", "weight_bytes")},
        "average_bits": final["bits"],
        "model": model,
        "history": state.history,
        "preservation": state.preservation,
        "steps": state.step,
        "seconds": seconds,
        "out_dir": str(out) if out is not None else None,
        "file_bytes": file_bytes,
    }
