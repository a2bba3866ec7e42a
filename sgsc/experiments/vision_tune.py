"""Tuning SGSC's gamma and learning rates on the validation split of Table I's first seed."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from sgsc.experiments.common import git_commit, metadata, write_json
from sgsc.experiments.pool import run_jobs
from sgsc.experiments.targets import choose
from sgsc.experiments.vision import VisionSettings, command_line, load_run_data, measure, self_compress, train_float
from sgsc.train import TrainConfig

TUNING_FILE = "vision_tuning.json"


def _tune_job(start: nn.Module, config: TrainConfig, settings: VisionSettings, out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    run = load_run_data(settings, config.seed)
    result = self_compress(start, config, run)
    exponent_part = "" if config.exponent_lr is None else f"-elr{config.exponent_lr:g}"
    name = f"sgsc-gamma{config.gamma:g}-qlr{config.quant_lr:g}{exponent_part}-steps{config.steps}"
    row, _ = measure(name, result.model, run, out)
    del row["test_accuracy"]  # tuning looks at validation only; the test split is for the final table
    return {"gamma": config.gamma, "quant_lr": config.quant_lr, "exponent_lr": config.exponent_lr, "steps": config.steps,
            "train_seconds": result.seconds, **row}


def tune(settings: VisionSettings, grid: list[tuple], out: str | Path = "results", workers: int = 1) -> dict:
    """SGSC at each ``(gamma, quant_lr[, steps[, exponent_lr]])`` of ``grid`` on the first seed.

    Every run starts from the float snapshot after ``settings.float_steps`` and is scored on the
    validation split; ``steps`` and ``exponent_lr`` default to ``settings``'. Writes ``<out>/vision_tuning.json``
    with every run, the float model's validation accuracy and bytes (after ``float_steps + steps``),
    the choice of :func:`choose` and the command that reproduces it.
    """
    if not grid or any(len(point) not in (2, 3, 4) for point in grid):
        raise ValueError(f"grid must be a non-empty list of (gamma, quant_lr[, steps[, exponent_lr]]) tuples, got {grid!r}")
    out = Path(out)
    seed = settings.seeds[0]
    run = load_run_data(settings, seed)
    started, commit = time.perf_counter(), git_commit()
    final, start, _ = train_float(settings, seed, run)
    tuning_dir = out / "vision-tuning"
    float_row, _ = measure("float", final, run, tuning_dir)
    threads = torch.get_num_threads()
    configs = [dataclasses.replace(settings.train_config(seed), gamma=point[0], quant_lr=point[1],
                                   steps=int(point[2]) if len(point) >= 3 else settings.steps,
                                   exponent_lr=point[3] if len(point) == 4 else settings.exponent_lr, progress=False)
               for point in grid]
    rows = run_jobs(_tune_job, [(start, c, settings, tuning_dir, threads) for c in configs], workers, settings.progress)
    result = {
        "experiment": "vision-tuning",
        "command": command_line(settings, out, workers) + " --tune " + " ".join(",".join(f"{v:g}" for v in p) for p in grid),
        "meta": {**metadata(torch.device("cpu"), commit), "workers": workers, "wall_seconds": time.perf_counter() - started},
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "float": {"val_accuracy": float_row["val_accuracy"], "file_bytes": float_row["file_bytes"]},
        "runs": rows,
        "choice": choose(rows, float_row["val_accuracy"], float_row["file_bytes"]),
    }
    write_json(out / TUNING_FILE, result)
    return result
