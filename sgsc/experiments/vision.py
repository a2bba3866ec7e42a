"""Table I: the paper's CNN compressed by SGSC, unsafe self-compression and the usual alternatives.

One invocation trains, per seed, a float baseline for ``float_steps + steps`` steps and snapshots
it after ``float_steps``; every method that trains (SGSC, unsafe, fixed-bit QAT, magnitude pruning)
starts from that snapshot and trains ``steps`` more, so each ends after as many steps as the float
baseline. Post-training quantization starts from the final float model. Every model is exported
(packed file through :func:`sgsc.export.save_packed`; the float baseline as a float32 safetensors
file), loaded back, and measured from the loaded file: test and validation accuracy, on-disk bytes,
average stored bits per weight, CPU latency at batch 1 and 256.

On the first seed it also runs the ablations (rounding mode; each preservation criterion alone and a
random set of the same size; restore alone and the preservation loss alone), a gamma sweep of SGSC
and unsafe, and the robustness checks, and draws accuracy against on-disk bytes for every method
(``vision_pareto.png``).

Hyper-parameters are chosen on the validation split (carved from the training data); the test
split is only reported. The methods, the settings and the configs derived from them are in
:mod:`sgsc.experiments.vision_settings`; this module runs them.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from sgsc import export
from sgsc._deps import require
from sgsc.experiments import baselines, vision_report
from sgsc.experiments.common import (
    device_name,
    float_mode,
    git_commit,
    latencies_ms,
    load_float,
    mean_std,
    metadata,
    save_float,
    thaw_bits,
    write_json,
    zlib_bytes,
)
from sgsc.experiments.pool import checked_workers, run_jobs
from sgsc.experiments.robustness import EPSILONS, NOISE_LEVELS, Perturber, robustness
from sgsc.experiments.targets import sweep_prefix, vision_targets
from sgsc.experiments.vision_settings import (
    CRITERIA_ALONE,
    METHODS,
    PRUNE_SPARSITY,
    PTQ_BITS,
    QAT_BITS,
    QUICK,
    SAFETY_ALONE,
    TABLE_KEYS,
    VisionSettings,
    command_line,
    float_config,
    quick_settings,
)
from sgsc.ops.reference import ROUNDING_MODES
from sgsc.train import CompressResult, Data, TrainConfig, evaluate, new_model, train, unsafe
from sgsc.train.data import load_vision

__all__ = [
    "CRITERIA_ALONE",
    "METHODS",
    "PLOT_FILE",
    "PRUNE_SPARSITY",
    "PTQ_BITS",
    "QAT_BITS",
    "QUICK",
    "RESULT_FILE",
    "SAFETY_ALONE",
    "TABLE_KEYS",
    "VisionRunData",
    "VisionSettings",
    "ablation_jobs",
    "add_latency",
    "command_line",
    "float_config",
    "load_run_data",
    "measure",
    "method_jobs",
    "quick_settings",
    "run",
    "run_seed",
    "self_compress",
    "summarize",
    "train_float",
]

tqdm = require("tqdm", "experiments").tqdm

RESULT_FILE = "vision.json"
PLOT_FILE = "vision_pareto.png"


# ---- data -----------------------------------------------------------------------------------


@dataclass
class VisionRunData:
    data: Data  # full splits: every reported number is measured on these
    trainer_view: Data  # the same training split; one-example val/test so the trainer skips its own evaluation
    mean: float
    std: float


def load_run_data(settings: VisionSettings, seed: int) -> VisionRunData:
    """The seed's splits (the validation split is carved from training data with this seed)."""
    vision = load_vision(settings.data_dir, settings.data, seed=seed)
    model_config = {"in_channels": vision.in_channels, "image_size": vision.image_size,
                    "num_classes": vision.num_classes}
    data = Data(vision.train, vision.val, vision.test, False, "paper_cnn", model_config, vision.source)
    tiny = TensorDataset(*(t[:1] for t in vision.val.tensors))
    return VisionRunData(data, dataclasses.replace(data, val=tiny, test=tiny), vision.mean, vision.std)


# ---- measuring one model --------------------------------------------------------------------


def measure(name: str, model: nn.Module, run: VisionRunData, out: Path) -> tuple[dict, nn.Module]:
    """Export ``model`` (float32 file for ``float``, else packed), load it back and score the loaded model.

    Latency is timed later, by :func:`add_latency`, once no training runs beside it.
    """
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    if name == "float":
        path = out / f"{name}.safetensors"
        save_float(model, path)
        loaded = load_float(path)
        bits = 32.0
    else:
        path = out / f"{name}.sgsc"
        bits = export.save_packed(model, path).average_bits
        loaded = export.load_packed(path)
    row = {
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "zlib_bytes": zlib_bytes(path),
        "average_bits": bits,
        "test_accuracy": evaluate(loaded, run.data.test, batch_size=256)["accuracy"],
        "val_accuracy": evaluate(loaded, run.data.val, batch_size=256)["accuracy"],
        "channels": list(model.config.channels),  # conv channels left after physical pruning
    }
    return row, loaded


# ---- methods --------------------------------------------------------------------------------


def train_float(settings: VisionSettings, seed: int, run: VisionRunData) -> tuple[nn.Module, nn.Module, float]:
    """The float baseline after ``float_steps + steps`` steps, its snapshot after ``float_steps``, seconds."""
    config = float_config(settings, seed)
    torch.manual_seed(seed)  # the trainer seeds too, but only after the model is built
    model = float_mode(new_model(config, run.data))
    snapshot = {}

    def take(module: nn.Module, step: int) -> None:
        if step == settings.float_steps:
            snapshot["state"] = copy.deepcopy(module.state_dict())

    handle = baselines.on_training_step(model, take)
    try:
        result = train(config, model=model, data=run.trainer_view)
    finally:
        handle.remove()
    start = copy.deepcopy(result.model)
    start.load_state_dict(snapshot["state"])
    return result.model, start, result.seconds


def self_compress(start: nn.Module, config: TrainConfig, run: VisionRunData) -> CompressResult:
    """SGSC (or unsafe, by ``config``) from the float snapshot: bits learnable again from ``init_bits``.

    The trainer switches the model to ``config.rounding``.
    """
    model = thaw_bits(copy.deepcopy(start), config.init_bits)
    return train(config, model=model, data=run.trainer_view)


def _timed(function, *args) -> tuple[nn.Module, float]:
    started = time.perf_counter()
    model = function(*args)
    return model, time.perf_counter() - started


def method_jobs(settings: VisionSettings, seed: int, run: VisionRunData, final: nn.Module, start: nn.Module):
    """``(name, thunk)`` per compressed method of Table I; each thunk returns ``(model, seconds, extra)``."""
    config = settings.train_config(seed)
    # baselines quantize with round-to-nearest, as a practitioner would
    plain = dataclasses.replace(config, rounding="nearest")
    sized = dataclasses.replace(config, gamma=settings.sized_unsafe_gamma)

    def from_train(result: CompressResult, **extra) -> tuple[nn.Module, float, dict]:
        return result.model, result.seconds, extra

    jobs = [
        ("unsafe", lambda: from_train(self_compress(start, unsafe(config), run))),
        ("sgsc", lambda: from_train(self_compress(start, config, run))),
        ("unsafe_sized", lambda: from_train(self_compress(start, unsafe(sized), run), gamma=settings.sized_unsafe_gamma)),
    ]
    for name, bits in PTQ_BITS.items():
        jobs.append((name, lambda bits=bits: (*_timed(baselines.post_training_quantize, final, bits), {})))
    for name, bits in QAT_BITS.items():
        jobs.append((name, lambda bits=bits: from_train(
            baselines.fixed_bit_qat(start, bits, plain, run.trainer_view))))
    for name, sparsity in PRUNE_SPARSITY.items():
        def prune_job(sparsity=sparsity):
            result, sparsity = baselines.magnitude_prune(start, sparsity, plain, run.trainer_view)
            return from_train(result, sparsity=sparsity)

        jobs.append((name, prune_job))
    return jobs


def ablation_jobs(settings: VisionSettings, seed: int, run: VisionRunData, start: nn.Module):
    """``(group, name, thunk)`` of the first seed's extra runs: rounding, preservation criteria, each half of
    the safety machinery alone, gamma sweep."""
    config = settings.train_config(seed)
    jobs = []
    if settings.ablations:
        for mode in ROUNDING_MODES:
            if mode != settings.rounding:
                other = dataclasses.replace(config, rounding=mode)
                jobs.append(("rounding", mode, lambda other=other: self_compress(start, other, run)))
        for name, weights in CRITERIA_ALONE.items():
            alone = dataclasses.replace(config, preservation_weights=weights)
            jobs.append(("preservation", name, lambda alone=alone: self_compress(start, alone, run)))
        drawn = dataclasses.replace(config, preservation_method="random")
        jobs.append(("preservation", "random", lambda: self_compress(start, drawn, run)))
        for name, change in SAFETY_ALONE.items():
            half = dataclasses.replace(config, **change)
            jobs.append(("safety", name, lambda half=half: self_compress(start, half, run)))
    for gamma in settings.sweep_gammas:
        if gamma == settings.gamma:
            continue
        swept = dataclasses.replace(config, gamma=gamma)
        jobs.append(("sweep", f"{sweep_prefix('sgsc')}{gamma:g}", lambda swept=swept: self_compress(start, swept, run)))
        jobs.append(("sweep", f"{sweep_prefix('unsafe')}{gamma:g}",
                     lambda swept=swept: self_compress(start, unsafe(swept), run)))
    return jobs


# ---- one seed, all seeds --------------------------------------------------------------------


def _record(name: str, model: nn.Module, seconds: float, steps: int, extra: dict, run, out: Path, bar):
    bar.set_description(f"{out.name} {name}: measuring")
    row, loaded = measure(name, model, run, out)
    return {**row, "train_seconds": seconds, "steps": steps, **extra}, loaded


def run_seed(settings: VisionSettings, seed: int, out: Path, bar, first: bool) -> dict:
    """Every method (and on the first seed the ablations, sweep and robustness) for one seed."""
    run = load_run_data(settings, seed)
    seed_dir = out / f"vision-seed{seed}"
    bar.set_description(f"seed {seed} float")
    final, start, seconds = train_float(settings, seed, run)
    rows, loaded = {}, {}
    rows["float"], loaded["float"] = _record("float", final, seconds, settings.float_steps + settings.steps, {},
                                             run, seed_dir, bar)
    bar.update(1)
    for name, job in method_jobs(settings, seed, run, final, start):
        bar.set_description(f"seed {seed} {name}")
        model, seconds, extra = job()
        steps = 0 if name in PTQ_BITS else settings.steps
        rows[name], loaded[name] = _record(name, model, seconds, steps, extra, run, seed_dir, bar)
        bar.update(1)
    float_bytes = rows["float"]["file_bytes"]
    for row in rows.values():
        row["pct_of_float"] = 100.0 * row["file_bytes"] / float_bytes
    result = {"seed": seed, "data": {"source": run.data.source, "train": len(run.data.train),
                                     "val": len(run.data.val), "test": len(run.data.test)}, "methods": rows}
    if first:
        result["extra"] = _run_extras(settings, seed, run, start, seed_dir, bar, float_bytes)
        result["robustness"] = _run_robustness(settings, run, loaded, seed, bar)
    return result


def _run_extras(settings, seed, run, start, seed_dir: Path, bar, float_bytes: int) -> list[dict]:
    rows = []
    for group, name, job in ablation_jobs(settings, seed, run, start):
        bar.set_description(f"seed {seed} {group} {name}")
        result = job()
        file_name = f"{group}-{name}".replace(" ", "_").replace("=", "")
        row, _ = _record(file_name, result.model, result.seconds, settings.steps, {}, run, seed_dir, bar)
        row.update(group=group, name=name, pct_of_float=100.0 * row["file_bytes"] / float_bytes)
        rows.append(row)
        bar.update(1)
    return rows


def _run_robustness(settings, run: VisionRunData, loaded: dict, seed: int, bar) -> dict:
    x, y = (t[: settings.robustness_examples] for t in run.data.test.tensors)
    perturber = Perturber(run.mean, run.std, pgd_steps=settings.pgd_steps, seed=seed)
    models = {}
    for name, model in loaded.items():
        bar.set_description(f"seed {seed} robustness {name}")
        models[name] = robustness(model, x, y, perturber)
    return {"examples": len(x), "noise_levels": list(NOISE_LEVELS), "epsilons": list(EPSILONS),
            "pgd_steps": settings.pgd_steps, "seed": seed, "models": models}


def _extra_count(settings: VisionSettings) -> int:
    """Runs beyond Table I on the first seed: ablations and the gamma sweep."""
    extras = len(ROUNDING_MODES) - 1 + len(CRITERIA_ALONE) + 1 + len(SAFETY_ALONE) if settings.ablations else 0
    return extras + 2 * sum(1 for g in settings.sweep_gammas if g != settings.gamma)


def summarize(seeds: list[dict]) -> dict:
    """Per method, mean and standard deviation over seeds of every :data:`TABLE_KEYS` value."""
    return {
        name: {key: mean_std([s["methods"][name][key] for s in seeds]) for key in TABLE_KEYS}
        for name in METHODS
    }


def _seed_worker(settings: VisionSettings, seed: int, out: Path, first: bool, threads: int, position: int) -> dict:
    torch.set_num_threads(threads)
    total = len(METHODS) + (_extra_count(settings) if first else 0)
    with tqdm(total=total, disable=not settings.progress, dynamic_ncols=True, position=position) as bar:
        return run_seed(settings, seed, out, bar, first)


def _run_seeds(settings: VisionSettings, out: Path, workers: int) -> list[dict]:
    """Every seed's results, in order; with ``workers > 1`` seeds run in that many processes at once."""
    threads = torch.get_num_threads()
    jobs = [(settings, seed, out, index == 0, threads, index % workers) for index, seed in enumerate(settings.seeds)]
    return run_jobs(_seed_worker, jobs, workers)


def add_latency(seeds: list[dict], out: Path, settings: VisionSettings, example: torch.Tensor) -> None:
    """Time every model file of every seed (loaded back, on the CPU) at batch 1 and 256, in place.

    All files are timed side by side (:func:`latencies_ms`), so their latencies compare within one run.
    """
    rows, models = [], []
    for seed_result in seeds:
        seed_dir = out / f"vision-seed{seed_result['seed']}"
        for row in (*seed_result["methods"].values(), *seed_result.get("extra", [])):
            path = seed_dir / row["file"]
            rows.append(row)
            models.append(load_float(path) if path.suffix == ".safetensors" else export.load_packed(path))
    for key, batch, repeats in (("latency_batch1_ms", 1, settings.latency_repeats[0]),
                                ("latency_batch256_ms", 256, settings.latency_repeats[1])):
        for row, latency in zip(rows, latencies_ms(models, example, batch, repeats, settings.latency_rounds)):
            row[key] = latency


def run(settings: VisionSettings, out: str | Path = "results", workers: int = 1) -> dict:
    """Run Table I with its ablations and write ``<out>/vision.json`` and ``<out>/vision_pareto.png``.

    ``workers`` processes train seeds at once (each with this process's torch thread count); latency
    is then timed in this process alone, one model at a time.
    """
    if not isinstance(settings, VisionSettings):
        raise TypeError(f"settings must be a VisionSettings, got {type(settings).__name__}")
    workers = checked_workers(workers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started, commit = time.perf_counter(), git_commit()
    seeds = _run_seeds(settings, out, min(workers, len(settings.seeds)))
    example = load_run_data(settings, settings.seeds[0]).data.test.tensors[0][0]
    add_latency(seeds, out, settings, example)
    table = summarize(seeds)
    device = torch.device("cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu")
    result = {
        "experiment": "vision",
        "command": command_line(settings, out, workers),
        "meta": {**metadata(device, commit), "latency_device": device_name(torch.device("cpu")),
                 "workers": workers, "wall_seconds": time.perf_counter() - started},
        "settings": dataclasses.asdict(settings),
        "methods": METHODS,
        "seeds": seeds,
        "table": table,
        "targets": vision_targets(table, seeds[0], settings.gamma, settings.sized_unsafe_gamma),
        "plot": PLOT_FILE,
    }
    vision_report.pareto_plot(result, out / PLOT_FILE)
    write_json(out / RESULT_FILE, result)
    return result
