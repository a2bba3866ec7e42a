"""ResNet-20 on Fashion-MNIST, compressed through the public API only.

The model is He et al.'s CIFAR ResNet-20 written with plain ``nn`` modules
(:class:`~sgsc.experiments.resnet_model.ResNet20`): a 3x3 stem, 3 stages of 3 basic blocks at 16/32/64
channels, global average pooling and a linear classifier; where a stage halves the resolution and
doubles the width the shortcut is a 1x1 convolution with BatchNorm (option B), elsewhere the
identity. 272,186 parameters for 1x28x28 inputs.

Per seed (nothing from the zoo trainer: every compressed model goes through ``sgsc.quantize_model``,
``sgsc.compress``, ``prune_zero_bit_units``, ``sgsc.save_packed`` and ``sgsc.load_packed``):

* ``float``: plain PyTorch training (Adam, cosine schedule, seeded batches) for
  ``float_steps + steps`` steps, snapshot after ``float_steps``; stored as a float32 safetensors file.
* ``unsafe``, ``sgsc``: ``sgsc.compress`` from the quantized snapshot (8 bits) for ``steps`` steps;
  unsafe with ``preserve=None, lambda_=0, restore=False``, SGSC with a preservation set chosen by
  :func:`sgsc.train.preservation.build` on the snapshot from a seeded pool of training examples
  (passed to ``compress`` as indices: scoring all 54,000 examples would cost minutes of this CPU).
* ``qat_2``: the snapshot calibrated to per-channel int2, then ``sgsc.compress`` with ``gamma=0``, no
  preservation set, no restore, bits frozen (weights and step sizes train), ``steps`` steps.
* ``ptq_int8``, ``ptq_int4``: per-channel calibration of the final float model, no training.

Every compressed model is put in eval mode, its zero-bit channels are physically removed by
``prune_zero_bit_units`` (the parameters left and the zero-bit channels it had to keep are
recorded), it is written by ``sgsc.save_packed`` and loaded back with
``sgsc.load_packed(path, model=resnet20())``; accuracy and latency are measured on the loaded model.

Each method of each seed writes ``<out>/resnet-seed<N>/<method>.json`` when done; a later run skips it
(resume) when the settings that method depends on are the same, and runs it again otherwise. Latency is timed at the
end over every file of every seed side by side. :mod:`sgsc.experiments.resnet_report` renders the
RESULTS.md section from ``resnet.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import sgsc
from sgsc.experiments import baselines
from sgsc.experiments.common import device_name, git_commit, latencies_ms, mean_std, metadata, write_json
from sgsc.experiments.pool import checked_workers, run_jobs
from sgsc.experiments.resnet_model import parameter_count, resnet20
from sgsc.experiments.targets import resnet_targets
from sgsc.train import evaluate, preservation
from sgsc.train.data import load_vision

RESULT_FILE = "resnet.json"
METHODS = {
    "float": "float32 baseline (plain PyTorch training)",
    "unsafe": "unsafe self-compression (no preservation set, lambda 0, no restore)",
    "sgsc": "SGSC (preservation set, restore)",
    "ptq_int8": "post-training per-channel int8",
    "ptq_int4": "post-training per-channel int4",
    "qat_2": "fixed-bit QAT, 2 bits",
}
PTQ_BITS = {"ptq_int8": 8, "ptq_int4": 4}
RUN_ORDER = ("float", "ptq_int8", "ptq_int4", "qat_2", "unsafe", "sgsc")  # what gamma changes comes last
QAT_BITS = 2
# QAT trains weights and per-channel step sizes (exponents) at Table I's rate for the quantizers; SGSC
# and unsafe train bits and exponents at ResNetSettings.quant_lr
QAT_QUANT_LR = 0.2
CURVE_STEPS = 50  # the float training loss curve: the mean of each this many steps
TABLE_KEYS = ("test_accuracy", "val_accuracy", "file_bytes", "pct_of_float", "parameters", "average_bits",
              "latency_batch256_ms", "train_seconds")


# ---- settings -------------------------------------------------------------------------------

# The gamma of SGSC and unsafe was chosen on seed 0's validation split before the table was run: SGSC
# from seed 0's float snapshot (600 steps, the same as the table's) for 300 steps at each gamma below
# (quant_lr 0.2, k 25, threshold 0.02, 500 preserved examples of a 3000 pool), scored on the first 2000
# validation examples: gamma -> (val accuracy, file bytes estimated by the trainer before pruning).
# PILOT_FLOAT_VAL: the snapshot's accuracy on the whole validation split.
# Both pilots restored lowered bits at every check of their first 200 steps (the preservation accuracy fell
# from 0.77 to 0.15-0.3 within 25 steps at this quant_lr) and compressed only once the cosine schedule had
# slowed the bits. QUANT_LR_PROBE: SGSC at gamma 0.3 with quant_lr 0.05, 100 steps at a constant rate from
# the same snapshot: fewer restores but slower bits (val accuracy, estimated bytes, average bits) -- not
# smaller, so the table keeps quant_lr 0.2.
GAMMA_PILOT: dict[str, list[float]] = {"0.3": [0.8905, 185519], "1.0": [0.8905, 196809]}
PILOT_FLOAT_VAL = 0.881
QUANT_LR_PROBE = {"gamma": 0.3, "quant_lr": 0.05, "steps": 100, "val_accuracy": 0.709, "bytes": 248799,
                  "average_bits": 6.23}


@dataclass
class ResNetSettings:
    """Everything a ResNet run depends on. The defaults are the full Fashion-MNIST run, sized to about
    35 minutes of a shared 2-core CPU (0.47 s per batch-64 step of one thread, measured first)."""

    data: str = "fashion-mnist"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1)
    float_steps: int = 600  # plain float training before the snapshot (about 0.7 epoch at batch 64)
    steps: int = 300  # steps of every method that trains from the snapshot; float trains as many more
    batch_size: int = 64
    lr: float = 1e-3
    quant_lr: float = 0.2  # bits and exponents of SGSC and unsafe (QAT: QAT_QUANT_LR)
    lr_schedule: str = "cosine"
    gamma: float = 0.3  # chosen on seed 0's validation split: GAMMA_PILOT
    lambda_: float = 1.0
    k: int = 25
    max_drop: float = 0.01  # the contract on the guard, in accuracy (a fraction)
    preserve_pool: int = 3000  # training examples the preservation criteria score (seeded draw)
    preserve_examples: int = 500  # of them, the preservation set
    init_bits: float = 8.0
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 3
    val_examples: int = 2000  # validation accuracy on this many (the whole test split is always scored)
    latency_repeats: int = 6
    latency_rounds: int = 3
    progress: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        self.seeds, self.widths = tuple(self.seeds), tuple(self.widths)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds!r}")
        for name in ("float_steps", "steps", "batch_size", "k", "preserve_pool", "preserve_examples", "blocks",
                     "val_examples", "latency_repeats", "latency_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.preserve_examples > self.preserve_pool:
            raise ValueError(f"preserve_examples ({self.preserve_examples}) exceeds preserve_pool "
                             f"({self.preserve_pool})")
        if not (isinstance(self.gamma, (int, float)) and self.gamma >= 0):
            raise ValueError(f"gamma must be a number >= 0, got {self.gamma!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")

    def identity(self, method: str) -> dict:
        """The settings ``method``'s result depends on: a saved result is reused only when they match, so
        a new gamma reruns SGSC and unsafe but reuses the float model, PTQ and QAT."""
        skip = {"seeds", "progress", "latency_repeats", "latency_rounds"}
        if method in ("float", *PTQ_BITS, "qat_2"):
            skip |= {"gamma", "lambda_", "k", "max_drop", "preserve_pool", "preserve_examples", "init_bits"}
        if method in ("float", *PTQ_BITS):
            skip.add("quant_lr")
        values = {key: value for key, value in dataclasses.asdict(self).items() if key not in skip}
        if method == "qat_2":
            values["quant_lr"] = QAT_QUANT_LR  # the rate QAT's step sizes train at
        return values


QUICK = dict(data="digits", seeds=(0, 1), float_steps=60, steps=30, batch_size=32, lr=3e-3, quant_lr=0.2, gamma=0.3,
             k=10, max_drop=0.05, preserve_pool=200, preserve_examples=40, widths=(4, 8, 16), blocks=1,
             val_examples=400, latency_repeats=2, latency_rounds=1)


def quick_settings(**overrides) -> ResNetSettings:
    """The ``--quick`` preset: digits (8x8), a one-block-per-stage ResNet of 4/8/16 channels, tens of steps."""
    return ResNetSettings(**{**QUICK, "quick": True, **overrides})


# ---- data and training ----------------------------------------------------------------------


def load_data(settings: ResNetSettings, seed: int):
    return load_vision(settings.data_dir, settings.data, seed=seed)


def _factory(settings: ResNetSettings, vision) -> nn.Module:
    return resnet20(vision.in_channels, vision.num_classes, settings.widths, settings.blocks)


def train_float(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: ResNetSettings, seed: int,
                snapshot_at: int, total: int) -> tuple[dict, float, list[float]]:
    """Plain Adam training for ``total`` steps (cosine schedule over them, seeded epoch permutations);
    returns the state dict after ``snapshot_at`` steps, the seconds taken and the training loss curve
    (the mean of every ``CURVE_STEPS`` steps): whether the float model converged."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), settings.lr)
    order, position, snapshot = torch.randperm(len(x), generator=generator), 0, None
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(total):
        if step == snapshot_at:
            snapshot = copy.deepcopy(model.state_dict())
        factor = 1.0 if settings.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / total))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        if position + settings.batch_size > len(x):
            order, position = torch.randperm(len(x), generator=generator), 0
        index = order[position:position + settings.batch_size]
        position += settings.batch_size
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    curve = [sum(losses[i:i + CURVE_STEPS]) / len(losses[i:i + CURVE_STEPS]) for i in range(0, total, CURVE_STEPS)]
    return snapshot, time.perf_counter() - started, curve


def _compress_kwargs(settings: ResNetSettings, seed: int) -> dict:
    return dict(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, quant_lr=settings.quant_lr,
                lr_schedule=settings.lr_schedule, k=settings.k, max_drop=settings.max_drop, seed=seed,
                progress=settings.progress, eval_every=settings.steps, device="cpu")


def preservation_indices(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: ResNetSettings,
                         seed: int) -> list[int]:
    """Indices into the training split of the preservation set: the criteria's choice from a seeded pool."""
    pool = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))[:settings.preserve_pool]
    chosen = preservation.build(model, (x[pool], y[pool]), settings.preserve_examples / settings.preserve_pool,
                                seed=seed)
    return sorted(pool[chosen].tolist())


def _history_counts(history: list[dict]) -> dict:
    checks = [r for r in history if r.get("kind") == "check"]
    return {"checks": len(checks), "restores": sum(1 for r in checks if "rolled_back_to" in r),
            "groups_pruned_in_training": sum(len(g) for r in checks for g in r.get("pruned", {}).values())}


# ---- measuring one model --------------------------------------------------------------------


def _evaluate(model: nn.Module, vision, settings: ResNetSettings) -> dict:
    val = [t[:settings.val_examples] for t in vision.val.tensors]
    return {"test_accuracy": evaluate(model, vision.test, batch_size=256)["accuracy"],
            "val_accuracy": evaluate(model, torch.utils.data.TensorDataset(*val), batch_size=256)["accuracy"]}


def measure_packed(name: str, model: nn.Module, vision, settings: ResNetSettings, seed_dir: Path) -> dict:
    """Prune ``model``'s zero-bit channels, write it with ``sgsc.save_packed``, load it back, score the file."""
    from sgsc.nn.graph_pruning import prune_zero_bit_units  # needs torch-pruning (the train extra)

    model = model.cpu().eval()
    zero_bit = sum(int((layer.bits.detach() <= 0).sum()) for _, layer in sgsc.quantized_layers(model))
    report = prune_zero_bit_units(model, vision.test.tensors[0][:2])
    path = seed_dir / f"{name}.sgsc"
    summary = sgsc.save_packed(model, path)
    loaded = sgsc.load_packed(path, model=_factory(settings, vision))
    return {
        "file": path.name, "file_bytes": path.stat().st_size, "average_bits": summary.average_bits,
        "packed_bytes": summary.packed_bytes, "group_metadata_bytes": summary.group_metadata_bytes,
        "plain_bytes": summary.plain_bytes, "parameters": parameter_count(loaded),
        "pruning": {"zero_bit_groups": zero_bit, "parameters_before": report.parameters_before,
                    "parameters_after": report.parameters_after,
                    "removed": {c.layer: {kind: len(idx) for kind, idx in c.removed.items()} for c in report.changes
                                if c.removed},
                    "kept": [{"layer": k.layer, "kind": k.kind, "count": len(k.indices), "reason": k.reason}
                             for k in report.kept]},
        **_evaluate(loaded, vision, settings),
    }


# ---- one seed -------------------------------------------------------------------------------


def float_paths(seed_dir: Path) -> tuple[Path, Path]:
    return seed_dir / "float.safetensors", seed_dir / "float-snapshot.safetensors"


def _save_state(model_state: dict, path: Path) -> None:
    save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model_state.items()}, str(path))


def load_float(path: Path, settings: ResNetSettings, vision) -> nn.Module:
    model = _factory(settings, vision)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def fixed_bit_qat(snapshot: nn.Module, bits: int, settings: ResNetSettings, seed: int, vision):
    """``snapshot`` calibrated to per-channel int-``bits``, then ``settings.steps`` of ``sgsc.compress`` with
    bits frozen (weights and exponents, the step sizes, train), no size term, preservation or restore."""
    model = sgsc.quantize_model(copy.deepcopy(snapshot), init_bits=settings.init_bits)
    baselines.calibrate(model, bits)
    return sgsc.compress(model, vision.train.tensors, preserve=None, gamma=0.0, lambda_=0.0, restore=False,
                         prune=False, **{**_compress_kwargs(settings, seed), "quant_lr": QAT_QUANT_LR})


def run_method(name: str, settings: ResNetSettings, seed: int, vision, seed_dir: Path) -> dict:
    x, y = vision.train.tensors
    final_path, snapshot_path = float_paths(seed_dir)
    if name == "float":
        torch.manual_seed(seed)
        model = _factory(settings, vision)
        snapshot, seconds, curve = train_float(model, x, y, settings, seed, settings.float_steps,
                                               settings.float_steps + settings.steps)
        _save_state(snapshot, snapshot_path)
        _save_state(model.state_dict(), final_path)
        loaded = load_float(final_path, settings, vision)
        return {"file": final_path.name, "file_bytes": final_path.stat().st_size, "average_bits": 32.0,
                "parameters": parameter_count(loaded), "train_seconds": seconds,
                "steps": settings.float_steps + settings.steps, "loss_curve": curve, "curve_steps": CURVE_STEPS,
                **_evaluate(loaded, vision, settings)}
    if name in PTQ_BITS:
        started = time.perf_counter()
        model = baselines.post_training_quantize(sgsc.quantize_model(load_float(final_path, settings, vision)),
                                                 PTQ_BITS[name])
        seconds = time.perf_counter() - started  # calibration only, as training time excludes measuring
        return {**measure_packed(name, model, vision, settings, seed_dir), "train_seconds": seconds, "steps": 0}
    snapshot = load_float(snapshot_path, settings, vision)
    model = sgsc.quantize_model(copy.deepcopy(snapshot), init_bits=settings.init_bits)
    common = _compress_kwargs(settings, seed)
    extra = {}
    if name == "qat_2":
        result = fixed_bit_qat(snapshot, QAT_BITS, settings, seed, vision)
    elif name == "unsafe":
        result = sgsc.compress(model, (x, y), preserve=None, gamma=settings.gamma, lambda_=0.0, restore=False,
                               **common)
    elif name == "sgsc":
        started = time.perf_counter()
        indices = preservation_indices(model, x, y, settings, seed)
        extra["preservation_seconds"] = time.perf_counter() - started
        result = sgsc.compress(model, (x, y), preserve=indices, gamma=settings.gamma, lambda_=settings.lambda_,
                               **common)
        result.seconds += extra["preservation_seconds"]
    else:
        raise ValueError(f"unknown method {name!r}")
    return {**measure_packed(name, result.model, vision, settings, seed_dir), "train_seconds": result.seconds,
            "steps": result.steps, **_history_counts(result.history), **extra}


def run_seed(settings: ResNetSettings, seed: int, out: Path, threads: int = 1) -> dict:
    """Every method for ``seed``; a method whose ``<method>.json`` holds the settings it depends on
    (:meth:`ResNetSettings.identity`) is read back, not rerun; one run with other settings is run again."""
    torch.set_num_threads(threads)
    seed_dir = out / f"resnet-seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    vision = load_data(settings, seed)
    rows = {}
    for name in RUN_ORDER:
        identity = {**settings.identity(name), "seed": seed}
        done = seed_dir / f"{name}.json"
        if done.is_file():
            saved = json.loads(done.read_text(encoding="utf-8"))
            if saved["settings"] == json.loads(json.dumps(identity)):
                rows[name] = saved["row"]
                continue
            print(f"seed {seed}: {name} was run with other settings; running it again", flush=True)
        if settings.progress:
            print(f"seed {seed}: {name}", flush=True)
        rows[name] = run_method(name, settings, seed, vision, seed_dir)
        write_json(done, {"settings": identity, "row": rows[name]})
    rows = {name: rows[name] for name in METHODS}
    return {"seed": seed, "data": {"source": vision.source, "train": len(vision.train), "val": len(vision.val),
                                   "test": len(vision.test), "input": list(vision.test.tensors[0].shape[1:])},
            "methods": rows}


# ---- all seeds ------------------------------------------------------------------------------


def add_latency(seeds: list[dict], out: Path, settings: ResNetSettings, vision) -> None:
    """Time every file of every seed, loaded back, at batch 256, side by side (:func:`latencies_ms`)."""
    rows, models = [], []
    for seed_result in seeds:
        seed_dir = out / f"resnet-seed{seed_result['seed']}"
        for name, row in seed_result["methods"].items():
            path = seed_dir / row["file"]
            models.append(load_float(path, settings, vision) if name == "float"
                          else sgsc.load_packed(path, model=_factory(settings, vision)))
            rows.append(row)
    example = vision.test.tensors[0][0]
    for row, ms in zip(rows, latencies_ms(models, example, 256, settings.latency_repeats, settings.latency_rounds)):
        row["latency_batch256_ms"] = ms


def summarize(seeds: list[dict]) -> dict:
    float_bytes = {s["seed"]: s["methods"]["float"]["file_bytes"] for s in seeds}
    for s in seeds:
        for row in s["methods"].values():
            row["pct_of_float"] = 100.0 * row["file_bytes"] / float_bytes[s["seed"]]
    return {name: {key: mean_std([s["methods"][name][key] for s in seeds]) for key in TABLE_KEYS} for name in METHODS}


def command_line(settings: ResNetSettings, out: Path, workers: int) -> str:
    parts = ["sgsc", "experiment", "resnet"] + (["--quick"] if settings.quick else [])
    defaults = quick_settings() if settings.quick else ResNetSettings()
    for key, flag in (("data_dir", "--data-dir"), ("float_steps", "--float-steps"), ("steps", "--steps"),
                      ("gamma", "--gamma")):
        value = getattr(settings, key)
        if value is not None and value != getattr(defaults, key):
            parts += [flag, str(value)]
    if settings.seeds != defaults.seeds:
        parts += ["--seeds", *map(str, settings.seeds)]
    if workers > 1:
        parts += ["--workers", str(workers)]
    return shlex.join(parts + ["--threads", str(torch.get_num_threads()), "--out", str(out)])


def run(settings: ResNetSettings, out: str | Path = "results", workers: int = 1) -> dict:
    """Run the ResNet-20 table (resuming finished methods) and write ``<out>/resnet.json``."""
    if not isinstance(settings, ResNetSettings):
        raise TypeError(f"settings must be a ResNetSettings, got {type(settings).__name__}")
    workers = checked_workers(workers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started, commit, threads = time.perf_counter(), git_commit(), torch.get_num_threads()
    jobs = [(settings, seed, out, threads) for seed in settings.seeds]
    seeds = run_jobs(run_seed, jobs, min(workers, len(jobs)))
    torch.set_num_threads(threads)
    vision = load_data(settings, settings.seeds[0])
    add_latency(seeds, out, settings, vision)
    table = summarize(seeds)
    result = {
        "experiment": "resnet",
        "command": command_line(settings, out, workers),
        "meta": {**metadata(torch.device("cpu"), commit), "latency_device": device_name(torch.device("cpu")),
                 "workers": workers, "wall_seconds": time.perf_counter() - started,
                 "method_seconds": sum(r["train_seconds"] for s in seeds for r in s["methods"].values())},
        "settings": dataclasses.asdict(settings),
        # the pilot chose the full run's gamma; a --quick run's gamma is the preset's
        "gamma_pilot": None if settings.quick else {"float_val_accuracy": PILOT_FLOAT_VAL, "val_examples": 2000,
                                                    "runs": GAMMA_PILOT, "quant_lr_probe": QUANT_LR_PROBE},
        "float_parameters": seeds[0]["methods"]["float"]["parameters"],
        "methods": METHODS,
        "seeds": seeds,
        "table": table,
        "targets": resnet_targets(table),
    }
    write_json(out / RESULT_FILE, result)
    return result
