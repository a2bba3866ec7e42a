"""Accuracy against bytes, as the field evaluates compression: frontiers over seeds, and the contract.

For a model on Fashion-MNIST (``model``: the paper's CNN, or ResNet-20 as a user's model; what is
model-specific lives in :mod:`sgsc.experiments.frontier_models`), per seed: a float model is trained
(``float_steps``, then ``steps`` more for the float and PTQ rows), and from its snapshot every method
trains ``steps`` through the public API (:func:`sgsc.compress`, the baselines of
:mod:`sgsc.experiments.baselines`):

* SGSC at each gamma of ``gammas``, with the guard contract at ``max_drop``, for each preservation
  term of ``terms`` (``task``, ``distill``, and ``none``: the guard and rollback without a preservation term);
* unsafe self-compression at the same gammas (no guard, no preservation term);
* fixed-bit QAT at 2, 3 and 4 bits, post-training quantization to int4 and int8, and one SGSC run at
  ``one_run_max_drop`` and ``one_run_gamma`` (a large gamma the contract holds back).

Every model is exported, loaded back and scored on the test split (which no method sees). A method's
frontier is the upper envelope of its (bytes, accuracy) points; its accuracy at each budget of
``budgets`` (% of the float32 file) is interpolated linearly on that envelope, per seed, then averaged
over seeds with a 95% interval (Student's t). The contract table gives each SGSC run's test-split drop
from its reference (the snapshot at ``init_bits``, as compression started) beside ``max_drop`` and two
standard errors of the test split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import sgsc
from sgsc._deps import require
from sgsc.experiments import vision
from sgsc.experiments.common import git_commit, metadata, write_json
from sgsc.experiments.frontier_models import MODELS, TITLES, adapter
from sgsc.experiments.pool import checked_workers, run_jobs
from sgsc.train import CompressConfig

RESULT_FILE = "frontier.json"  # the paper CNN's; another model's is frontier_<model>.json
PLOT_FILE = "frontier.png"
SGSC_TERMS = {"sgsc": "task", "sgsc_distill": "distill", "sgsc_no_term": "none"}
LABELS = {"sgsc": "SGSC (task term)", "sgsc_distill": "SGSC (distillation term)",
          "sgsc_no_term": "SGSC (guard only, no term)", "unsafe": "unsafe self-compression",
          "qat": "fixed-bit QAT (2/3/4)", "ptq": "PTQ (int4/int8)"}
FAMILIES = tuple(LABELS)


@dataclass
class FrontierSettings:
    model: str = "paper_cnn"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    float_steps: int = 800
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    quant_lr: float = 0.2
    lr_schedule: str = "cosine"
    gammas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    terms: tuple[str, ...] = tuple(SGSC_TERMS.values())  # the preservation terms SGSC runs with
    preservation_batch: int = dataclasses.field(default_factory=lambda: CompressConfig().preservation_batch)
    patience: int = dataclasses.field(default_factory=lambda: CompressConfig().patience)  # failed checks before a rollback
    max_drop: float = 0.01
    k: int = 50
    fraction: float = 0.05
    init_bits: float = 8.0
    qat_bits: tuple[int, ...] = (2, 3, 4)
    ptq_bits: tuple[int, ...] = (4, 8)
    one_run_gamma: float = 0.3
    one_run_max_drop: float = 0.005
    budgets: tuple[float, ...] = (5.0, 7.5, 10.0)
    model_config: dict = dataclasses.field(default_factory=dict)
    progress: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("seeds", "gammas", "terms", "qat_bits", "ptq_bits", "budgets"):
            setattr(self, name, tuple(getattr(self, name)))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if not self.terms or not set(self.terms) <= set(SGSC_TERMS.values()):
            raise ValueError(f"terms must be some of {tuple(SGSC_TERMS.values())}, got {self.terms!r}")
        self.compress_config(0, 0.01, "task")  # the trainer's checks, on every hyper-parameter it receives

    def vision(self) -> vision.VisionSettings:
        """Table I's settings for the float model and the baselines, which this experiment shares."""
        return vision.VisionSettings(
            data=self.data, data_dir=self.data_dir, seeds=self.seeds, float_steps=self.float_steps, steps=self.steps,
            batch_size=self.batch_size, lr=self.lr, quant_lr=self.quant_lr, lr_schedule=self.lr_schedule,
            k=self.k, max_drop=self.max_drop, fraction=self.fraction, init_bits=self.init_bits,
            model_config=self.model_config, progress=False)

    def compress_config(self, seed: int, gamma: float, term: str, max_drop: float | None = None) -> CompressConfig:
        return CompressConfig(
            gamma=gamma, lambda_=0.0 if term == "none" else 1.0, preservation_loss=term,
            max_drop=self.max_drop if max_drop is None else max_drop, k=self.k, steps=self.steps,
            preservation_batch=self.preservation_batch, patience=self.patience,
            batch_size=self.batch_size, lr=self.lr, quant_lr=self.quant_lr, lr_schedule=self.lr_schedule, seed=seed,
            eval_every=self.steps, progress=False)


QUICK = dict(data="digits", seeds=(0, 1), float_steps=120, steps=60, batch_size=32, lr=3e-3, quant_lr=0.1,
             gammas=(0.05, 0.2), max_drop=0.05, k=20, fraction=0.1, qat_bits=(2, 4), ptq_bits=(4, 8),
             one_run_gamma=0.5, one_run_max_drop=0.05, budgets=(20.0, 30.0), model_config={"channels": [8, 16]})


# ResNet-20 costs about 5x the paper CNN per step on this CPU: half the steps, the default preservation term
# only, and gammas that reach the budgets (unsafe at 0.3 made 7.4% of float32 at 86.8% on seed 0, at 1.0 4.6% at
# 79.8%, and at 3.0 collapsed to 18.7%).
RESNET = dict(model="resnet20", float_steps=600, steps=300, gammas=(0.3, 1.0), terms=("distill",), one_run_gamma=3.0)
QUICK_RESNET = dict(model_config={"widths": (4, 8, 16), "blocks": 1}, terms=("distill",))


def quick_settings(**overrides) -> FrontierSettings:
    """Digits, a small CNN (or ResNet), tens of steps, two seeds: a smoke test of the whole pipeline."""
    model = overrides.get("model", "paper_cnn")
    return FrontierSettings(**{**QUICK, **(QUICK_RESNET if model == "resnet20" else {}), "quick": True, **overrides})


def default_settings(**overrides) -> FrontierSettings:
    """The full run for ``overrides["model"]`` (the paper CNN when absent), ``overrides`` applied."""
    preset = RESNET if overrides.get("model") == "resnet20" else {}
    return FrontierSettings(**{**preset, **overrides})


def result_names(settings: FrontierSettings) -> tuple[str, str]:
    """The result and plot file names of ``settings.model``."""
    stem = "frontier" if settings.model == "paper_cnn" else f"frontier_{settings.model}"
    return f"{stem}.json", f"{stem}.png"


# ---- one seed's float model, reference and preservation set ------------------------------------------


def _seed_dir(out: Path, seed: int, model: str = "paper_cnn") -> Path:
    return out / (f"frontier-seed{seed}" if model == "paper_cnn" else f"frontier-{model}-seed{seed}")


def prepare_seed(settings: FrontierSettings, seed: int, out: Path, threads: int) -> dict:
    """Train the float model, keep its snapshot, measure the float, PTQ and reference rows, choose the
    preservation set: what every method of the seed starts from. Read back when already done."""
    torch.set_num_threads(threads)
    seed_dir = _seed_dir(out, seed, settings.model)
    done = seed_dir / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    kind = adapter(settings)
    run = kind.data(seed)
    started = time.perf_counter()
    rows, keep, float_training = kind.prepare(seed, run, seed_dir)
    record = {"seed": seed, "rows": rows, "preservation": keep, "float_training": float_training,
              "prepare_seconds": time.perf_counter() - started, "data": kind.describe(run)}
    write_json(done, record)
    return record


# ---- the methods ---------------------------------------------------------------------------------------


def method_jobs(settings: FrontierSettings) -> list[tuple[str, str, float]]:
    """``(family, run name, parameter)`` of every trained run of one seed."""
    families = [family for family, term in SGSC_TERMS.items() if term in settings.terms] + ["unsafe"]
    jobs = [(family, f"{family}_g{gamma:g}", gamma) for family in families for gamma in settings.gammas]
    jobs += [("qat", f"qat_{bits}", bits) for bits in settings.qat_bits]
    jobs.append(("one_run", "one_run", settings.one_run_gamma))
    return jobs


def run_method(settings: FrontierSettings, seed: int, family: str, name: str, parameter: float, out: Path,
               threads: int) -> dict:
    """Train one run from the seed's snapshot, export it, load it back and score it; read back when done."""
    torch.set_num_threads(threads)
    seed_dir = _seed_dir(out, seed, settings.model)
    done = seed_dir / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    prepared = json.loads((seed_dir / "prepared.json").read_text(encoding="utf-8"))
    kind = adapter(settings)
    run = kind.data(seed)
    snapshot, model = kind.start(seed_dir, run)
    train = kind.train_split(run)
    started = time.perf_counter()
    extra = {}
    if family == "qat":
        trained = kind.qat(snapshot, int(parameter), seed, run)
    elif family == "unsafe":
        config = dataclasses.replace(settings.compress_config(seed, parameter, "none"), restore=False)
        trained = sgsc.compress(model, train, config).model
    else:
        term = settings.terms[0] if family == "one_run" else SGSC_TERMS[family]
        max_drop = settings.one_run_max_drop if family == "one_run" else None
        config = settings.compress_config(seed, parameter, term, max_drop)
        preserve = None if term == "none" else prepared["preservation"]
        result = sgsc.compress(model, train, config, preserve=preserve)
        trained = result.model
        extra = {"max_drop": config.max_drop, "contract": result.contract,
                 "rollbacks": sum(1 for r in result.history if "rolled_back_to" in r),
                 "checks": sum(1 for r in result.history if r["kind"] == "check")}
    seconds = time.perf_counter() - started
    row = {**kind.measure(name, trained, run, seed_dir), "family": family, "parameter": parameter,
           "train_seconds": seconds, **extra}
    write_json(done, row)
    return row


# ---- frontiers ---------------------------------------------------------------------------------------


def envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left frontier of ``(bytes %, accuracy)`` points: each kept point is more accurate than
    every smaller one."""
    frontier = []
    for size, accuracy in sorted(points):
        if not frontier or accuracy > frontier[-1][1]:
            frontier.append((size, accuracy))
    return frontier


def at_budget(points: list[tuple[float, float]], budget: float) -> float | None:
    """The accuracy of ``points``' frontier at ``budget``: linear between the two frontier points around it,
    the best point's when all are smaller, None when every point is larger (the method cannot get there)."""
    frontier = envelope(points)
    if not frontier or budget < frontier[0][0]:
        return None
    for (s0, a0), (s1, a1) in zip(frontier, frontier[1:]):
        if s0 <= budget <= s1:
            return a0 + (a1 - a0) * (budget - s0) / (s1 - s0)
    return frontier[-1][1]


def interval(values: list[float]) -> dict:
    """Mean and the half-width of its 95% interval over seeds (Student's t)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    scipy_stats = require("scipy.stats", "experiments")
    return {"mean": mean, "ci95": float(scipy_stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n),
            "n": n}


def family_points(seed_rows: dict[str, dict], family: str) -> list[tuple[float, float]]:
    members = {"ptq": lambda name: name.startswith("ptq_"), "qat": lambda name: name.startswith("qat_")}
    belongs = members.get(family, lambda name: seed_rows[name].get("family") == family)
    return [(row["pct_of_float"], row["test_accuracy"]) for name, row in seed_rows.items()
            if name not in ("float", "reference") and belongs(name)]


def summarize(seeds: list[dict], budgets: tuple[float, ...]) -> dict:
    """Per family and budget: accuracy on the frontier, per seed and over seeds; the best other method."""
    table = {}
    for family in (f for f in FAMILIES if any(family_points(seed["rows"], f) for seed in seeds)):
        table[family] = {}
        for budget in budgets:
            per_seed = [at_budget(family_points(seed["rows"], family), budget) for seed in seeds]
            reached = [value for value in per_seed if value is not None]
            table[family][f"{budget:g}"] = {
                "per_seed": per_seed, **(interval(reached) if len(reached) == len(per_seed) else {"mean": None})}
    verdicts = {}
    for budget in budgets:
        key = f"{budget:g}"
        others = {f: table[f][key]["mean"] for f in table if not f.startswith("sgsc") and table[f][key]["mean"]}
        sgsc_means = [(f, table[f][key]["mean"]) for f in SGSC_TERMS if f in table]
        best_sgsc = max(((f, mean) for f, mean in sgsc_means if mean is not None), key=lambda item: item[1],
                        default=(None, None))
        rival = max(others.items(), key=lambda item: item[1], default=(None, None))
        margin = None if best_sgsc[1] is None or rival[1] is None else best_sgsc[1] - rival[1]
        verdicts[key] = {"sgsc": best_sgsc[0], "rival": rival[0], "margin_points": None if margin is None
                         else 100 * margin, "met": margin is not None and margin >= 0.003}
    return {"table": table, "verdicts": verdicts,
            "target_met": sum(v["met"] for v in verdicts.values()) >= 2}


def contract_rows(seeds: list[dict]) -> list[dict]:
    """Each SGSC run's test drop from its seed's reference beside ``max_drop`` and 2 test standard errors."""
    rows = []
    for seed in seeds:
        reference = seed["rows"]["reference"]["test_accuracy"]
        n = seed["data"]["test"]
        for name, row in seed["rows"].items():
            if row.get("contract") is None:
                continue
            drop = reference - row["test_accuracy"]
            error = math.sqrt(reference * (1 - reference) / n)
            rows.append({"seed": seed["seed"], "run": name, "max_drop": row["max_drop"], "test_drop": drop,
                         "two_se": 2 * error, "within": drop <= row["max_drop"] + 2 * error,
                         "guard_bound": (row["contract"]["returned"] or {}).get("bound"),
                         "reference_returned": row["contract"]["returned"] is None,
                         "pct_of_float": row["pct_of_float"], "rollbacks": row["rollbacks"]})
    return rows


def one_run_against_sweep(seeds: list[dict]) -> list[dict]:
    """Per seed: SGSC's one run against unsafe's smallest file within 0.5 points of float on test, with
    the time of the one run and of the whole sweep that found that file."""
    rows = []
    for seed in seeds:
        float_accuracy = seed["rows"]["float"]["test_accuracy"]
        sweep = [row for row in seed["rows"].values() if row.get("family") == "unsafe"]
        within = [row for row in sweep if row["test_accuracy"] >= float_accuracy - 0.005]
        best = min(within, key=lambda row: row["file_bytes"], default=None)
        one = seed["rows"]["one_run"]
        rows.append({"seed": seed["seed"], "one_run_bytes": one["file_bytes"], "one_run_accuracy": one["test_accuracy"],
                     "one_run_seconds": one["train_seconds"], "unsafe_bytes": best and best["file_bytes"],
                     "unsafe_accuracy": best and best["test_accuracy"],
                     "sweep_seconds": sum(row["train_seconds"] for row in sweep),
                     "met": best is not None and one["file_bytes"] <= best["file_bytes"]
                     and one["train_seconds"] < sum(row["train_seconds"] for row in sweep)})
    return rows


# ---- the experiment ------------------------------------------------------------------------------------


def run(settings: FrontierSettings, out: str | Path = "results", workers: int = 1) -> dict:
    """Every seed's float model, then every method of every seed (``workers`` at a time); writes
    ``<out>/frontier.json`` and the plot, and returns the record."""
    workers = checked_workers(workers)
    out = Path(out)
    for seed in settings.seeds:
        _seed_dir(out, seed, settings.model).mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads() if workers == 1 else 1
    started, commit = time.perf_counter(), git_commit()
    prepared = run_jobs(prepare_seed, [(settings, seed, out, threads) for seed in settings.seeds], workers,
                        settings.progress)
    jobs = [(settings, seed, *job, out, threads) for seed in settings.seeds for job in method_jobs(settings)]
    rows = run_jobs(run_method, jobs, workers, settings.progress)
    seeds = []
    for record in prepared:
        seed_rows = dict(record["rows"])
        for job, row in zip(jobs, rows):
            if job[1] == record["seed"]:
                seed_rows[job[3]] = row
        float_bytes = seed_rows["float"]["file_bytes"]
        for row in seed_rows.values():
            row["pct_of_float"] = 100.0 * row["file_bytes"] / float_bytes
        seeds.append({**record, "rows": seed_rows})
    result = {"experiment": "frontier", "settings": dataclasses.asdict(settings),
              "command": command_line(settings, out, workers), "meta": {**metadata(torch.device("cpu"), commit),
                                                                          "wall_seconds": time.perf_counter() - started,
                                                                          "workers": workers, "worker_threads": threads},
              "seeds": seeds, "summary": summarize(seeds, settings.budgets), "contract": contract_rows(seeds),
              "one_run": one_run_against_sweep(seeds)}
    result_file, plot_file = result_names(settings)
    result["plot"] = plot(result, out / plot_file)
    write_json(out / result_file, result)
    return result


def command_line(settings: FrontierSettings, out: Path, workers: int) -> str:
    parts = ["sgsc", "experiment", "frontier", *(["--quick"] if settings.quick else [])]
    if settings.model != "paper_cnn":
        parts += ["--model", settings.model]
    defaults = (quick_settings if settings.quick else default_settings)(model=settings.model)
    for key in ("data", "data_dir", "float_steps", "steps", "max_drop", "preservation_batch", "patience"):
        value = getattr(settings, key)
        if value != getattr(defaults, key) and value is not None:
            parts += [f"--{key.replace('_', '-')}", str(value)]
    for key in ("seeds", "gammas", "terms"):
        if getattr(settings, key) != getattr(defaults, key):
            parts += [f"--{key}", *map(str, getattr(settings, key))]
    return shlex.join([*parts, "--workers", str(workers), "--out", str(out)])


def plot(result: dict, path: Path) -> str:
    """Accuracy against % of the float32 bytes, every run of every seed, each family's mean frontier."""
    plt = require("matplotlib.pyplot", "experiments")
    figure, axis = plt.subplots(figsize=(8, 5))
    colours = dict(zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    budgets = sorted({b for seed in result["seeds"] for name, row in seed["rows"].items()
                      if name not in ("float", "reference") for b in [row["pct_of_float"]]})
    for family in FAMILIES:
        points = [p for seed in result["seeds"] for p in family_points(seed["rows"], family)]
        if not points:
            continue
        axis.scatter(*zip(*points), s=12, alpha=0.35, color=colours[family])
        grid = [b for b in budgets if all(at_budget(family_points(s["rows"], family), b) is not None
                                          for s in result["seeds"])]
        means = [statistics.fmean(at_budget(family_points(s["rows"], family), b) for s in result["seeds"]) for b in grid]
        axis.plot(grid, means, color=colours[family], label=LABELS[family])
    float_accuracy = statistics.fmean(seed["rows"]["float"]["test_accuracy"] for seed in result["seeds"])
    axis.axhline(float_accuracy, color="grey", linestyle=":", label="float32 (mean)")
    title = TITLES[result["settings"].get("model", "paper_cnn")]
    axis.set(xlabel="% of the float32 file", ylabel="test accuracy", title=f"{title}: accuracy against bytes, every seed")
    axis.set_xlim(0, 35)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path.name
