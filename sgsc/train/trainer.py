"""The zoo trainer (``sgsc train`` / ``sgsc compress``): a client of :func:`sgsc.compress` like any user.

:func:`train` reads a :class:`~sgsc.train.config.TrainConfig`, loads the zoo's data and model, calls
:func:`~sgsc.train.loop.compress`, then writes the packed file and plots.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sgsc import export
from sgsc.nn import quantized_layers
from sgsc.nn.zoo import model_name
from sgsc.train.checkpoint import CHECKPOINT, check_resumable, load_checkpoint, model_from_checkpoint
from sgsc.train.config import TrainConfig
from sgsc.train.distributed import rank_world, setup_distributed
from sgsc.train.loop import CompressResult, compress
from sgsc.train.task import Data, load_data, new_model

PACKED = "model.sgsc"


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


def train(config: TrainConfig, model: nn.Module | None = None, data: Data | None = None) -> CompressResult:
    """Train (and compress) a zoo model under ``config``: :func:`compress` on the zoo's data, then the packed file.

    ``model`` (optional) is trained in place instead of a fresh or ``init_from`` model (ignored when
    resuming, which rebuilds the checkpoint's model); like an ``init_from`` model, its quantized layers
    (and its config) are switched to ``config.rounding`` first. ``data`` (optional) replaces
    :func:`load_data`. The preservation set is ``config.fraction`` of the training data when
    ``lambda_ > 0``; with ``restore`` the guard set is held out of it and the model returned is within
    ``max_drop`` of the reference (the unsafe baseline, :func:`~sgsc.train.config.unsafe`, has neither);
    the metric is accuracy, or loss for a language model; eval records score ``data.val`` and
    ``data.test``. Returns :func:`compress`'s result with ``file_bytes`` (the size of ``model.sgsc``, or
    None). With ``out_dir`` set it writes :func:`compress`'s files (the checkpoint records ``config``),
    the packed model ``model.sgsc`` and PNG plots there, on rank 0.
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


def _train(config: TrainConfig, model: nn.Module | None, data: Data | None, device) -> CompressResult:
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
    metric = "loss" if data.language else "accuracy"
    compression = config.compression()
    if config.restore and config.max_drop is None:  # the contract holds with or without a preservation term
        compression = dataclasses.replace(compression, max_drop=compression.max_drop_for(metric))
    result = compress(
        model, data.train, compression, preserve=config.fraction if config.lambda_ > 0 else None, metric=metric,
        eval_data={"val": data.val, "test": data.test}, out_dir=config.out_dir, resume=config.resume,
        run_config=dataclasses.asdict(config),
    )
    if out is not None and rank_world()[0] == 0:
        packed = export.save_packed(model, out / PACKED, data={"name": config.data, "seed": config.seed})
        result.file_bytes = packed.file_bytes
        if config.plots:
            from sgsc.train import plots

            plots.save_all(model, result.history, out)
    return result
