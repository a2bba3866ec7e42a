"""Table I's markdown for RESULTS.md and its accuracy-vs-bytes picture, from ``vision.json`` alone."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from sgsc._deps import require
from sgsc.experiments.common import safety_rule
from sgsc.experiments.targets import (
    EQUAL_SIZE,
    VISION_ACCURACY_POINTS,
    VISION_SIZE_PERCENT,
    accuracy_reach,
    sweep_rows,
    within_accuracy,
)


def _pm(stats: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def _quant_lrs(settings: dict) -> str:
    if settings["exponent_lr"] is None:  # exponents trained at quant_lr, with the bits
        return f"{settings['quant_lr']:g} (bits, exponents)"
    return f"{settings['quant_lr']:g} (bits) / {settings['exponent_lr']:g} (exponents)"


_HEAD_GROUPS = {
    "output": "the classifier one per class row (the paper's).",
    "channel": "the classifier one per feature map of the last conv block, across all classes (its input "
    "columns), so a zero-bit head group removes that feature map's conv channel with it.",
}


def _setup(result: dict) -> list[str]:
    meta, s = result["meta"], result["settings"]
    first = result["seeds"][0]["data"]
    hyper = (f"batch {s['batch_size']}, Adam lr {s['lr']:g} (weights) / {_quant_lrs(s)}, "
             f"{s['lr_schedule']} learning-rate schedule over each run's steps, "
             f"gamma {s['gamma']:g}, lambda {s['lambda_']:g}, init bits {s['init_bits']:g}, rounding "
             f"{s['rounding']}, safety check every {s['k']} steps, {safety_rule(s)}, preservation set "
             f"{s['fraction']:g} of the training split, model overrides {s['model_config'] or 'none (paper CNN)'}, "
             f"classifier groups per {s['head_groups']}")
    return [
        f"Data: {first['source']} ({first['train']} train / {first['val']} val / {first['test']} test; the "
        "validation split is carved from the training data, hyper-parameters were chosen on it, the test split is "
        "only reported).",
        "",
        f"Seeds {', '.join(str(x) for x in s['seeds'])}; the float baseline trains {s['float_steps'] + s['steps']} "
        f"steps; every method that trains starts from its snapshot at step {s['float_steps']} and trains "
        f"{s['steps']} more (the same total); post-training quantization starts from the final float model.",
        "",
        f"Hyper-parameters: {hyper}.",
        "",
        f"Measured on {meta['machine']}; training device {meta['device']}; latency on {meta['latency_device']} "
        f"with {meta['torch_threads']} torch thread(s); torch {meta['torch']}, sgsc {meta['sgsc']}, commit "
        f"`{meta['commit']}`; finished {meta['finished_utc']} after {meta['wall_seconds'] / 60:.1f} min.",
        "",
        f"Reproduce every row below: `{result['command']}`",
        "",
    ]


def _latency_method(result: dict) -> str:
    rounds = result["settings"]["latency_rounds"]
    return ("median of repeated forwards of the loaded model, timed after all training finished, every file of "
            f"every seed side by side ({rounds} round-robin passes over the files), so latencies compare within "
            "the table")


def _main_table(result: dict) -> list[str]:
    lines = [
        "| method | test accuracy (%) | val accuracy (%) | bytes on disk | % of float32 | zlib -9 bytes "
        "| bits/weight | latency b=1 (ms) | latency b=256 (ms) | training (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in result["methods"].items():
        row = result["table"][name]
        lines.append(
            f"| {label} | {_pm(row['test_accuracy'], 100)} | {_pm(row['val_accuracy'], 100)} "
            f"| {_pm(row['file_bytes'], digits=0)} | {_pm(row['pct_of_float'], digits=1)} "
            f"| {_pm(row['zlib_bytes'], digits=0)} | {_pm(row['average_bits'])} "
            f"| {_pm(row['latency_batch1_ms'], digits=3)} | {_pm(row['latency_batch256_ms'], digits=1)} "
            f"| {_pm(row['train_seconds'], digits=1)} |"
        )
    return lines + [
        "",
        "Accuracy, bytes and latency are measured on the model loaded back from its file (the float baseline from "
        "a float32 safetensors file, every other method from its sgsc packed file). Bits/weight: packed payload "
        "per quantized weight of the exported model (after any physical pruning of channels). zlib -9 bytes: the "
        f"same file after zlib, i.e. what an entropy coder would still remove. Latency: {_latency_method(result)}. "
        "Training time: the method's own steps (float: all of them); runs of different seeds may have shared the "
        "CPU, so times are indicative.",
        "",
    ]


def _equal_size(t: dict, sgsc_std_points: float) -> str:
    sized = t["unsafe_sized"]
    difference = sized["sgsc_minus_unsafe_points"]
    # a difference smaller than the seeds' spread is a tie, whatever its sign: say so beside the verdict
    spread = (f", within SGSC's spread over seeds ({sgsc_std_points:.2f}): a tie"
              if abs(difference) < sgsc_std_points else "")
    every_seed = (f"unsafe at gamma {sized['gamma']:g} on every seed: {100 * sized['test_accuracy']:.2f} ± "
                  f"{100 * sized['test_accuracy_std']:.2f}% at {sized['file_bytes']:.0f} bytes "
                  f"({100 * (sized['size_ratio'] - 1):+.1f}% size), SGSC {difference:+.2f} points{spread}")
    first_seed = "; ".join(
        f"gamma {r['gamma']:g}: {100 * r['test_accuracy']:.2f}% at {r['file_bytes']} bytes "
        f"({100 * (r['size_ratio'] - 1):+.1f}% size)" for r in t["unsafe_equal_size"]
    )
    closeness = (f"within {EQUAL_SIZE:.0%} of SGSC's size" if t["unsafe_within_5pct"]
                 else f"none within {EQUAL_SIZE:.0%}; the nearest")
    dominated = (f"; over every seed, unsafe at gamma {sized['gamma']:g} is no larger than SGSC and more accurate, "
                 "so it beats SGSC at SGSC's size" if sized["dominates_sgsc"] else "")
    return f"{every_seed}; first seed's unsafe runs {closeness}: {first_seed}{dominated}"


def _targets(result: dict) -> list[str]:
    t = result["targets"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    compared = t["equal_size_compared"]
    sgsc_std = 100 * result["table"]["sgsc"]["test_accuracy"]["std"]
    return [
        "Targets of the issue (means over seeds):",
        "",
        f"- SGSC accuracy >= float - {VISION_ACCURACY_POINTS:g} points: {verdict(t['accuracy_met'])} "
        f"({t['accuracy_gap_points']:+.2f} points).",
        f"- at <= {VISION_SIZE_PERCENT:g}% of the float32 bytes: {verdict(t['size_met'])} ({t['pct_of_float']:.1f}%).",
        f"- higher than unsafe self-compression at equal size ({_equal_size(t, sgsc_std)}): "
        f"{verdict(t['beats_unsafe'] and compared)}"
        + ("" if compared else " (no unsafe run of equal size to compare)") + ".",
        "",
    ]


def _accuracy_reach(result: dict) -> list[str]:
    """Where the accuracy target would be met, so a miss says how much size it asks for."""
    s, first = result["settings"], result["seeds"][0]
    reach = accuracy_reach(result["table"], first, s["gamma"], s["sized_unsafe_gamma"])
    best = reach["within_size"]
    if best is None:
        within = f"no method of Table I is at <= {VISION_SIZE_PERCENT:g}% of the float32 bytes."
    else:
        verdict = ("" if within_accuracy(best["gap_points"])
                   else f", so none there is within {VISION_ACCURACY_POINTS:g} points of float")
        within = (f"at <= {VISION_SIZE_PERCENT:g}% of the float32 bytes the most accurate method of Table I is "
                  f"\"{result['methods'][best['method']]}\": {best['gap_points']:+.2f} points at "
                  f"{best['pct_of_float']:.1f}% of the bytes{verdict}.")
    smallest = []
    for method, label in (("sgsc", "SGSC"), ("unsafe", "unsafe")):
        run = reach["smallest_within_tolerance"][method]
        smallest.append(f"no {label} run" if run is None else
                        f"{label} at gamma {run['gamma']:g} ({run['pct_of_float']:.1f}% of the float bytes, "
                        f"{run['gap_points']:+.2f} points)")
    return [f"What the accuracy target asks for: {within} On seed {first['seed']}, whose float model scores "
            f"{100 * reach['first_seed_float_accuracy']:.2f}%, the smallest files within {VISION_ACCURACY_POINTS:g} points of it (main, sized "
            f"and sweep gammas; single runs) are: {' and '.join(smallest)}.", ""]


def _method_notes(result: dict) -> list[str]:
    s = result["settings"]
    return [
        "How each method is obtained:",
        "",
        f"- quantizer groups, the same for every method: one (bits, exponent) pair per conv output channel; {_HEAD_GROUPS[s['head_groups']]}",
        "- float baseline: the paper CNN with bits and exponents frozen (rounding step 2^-23 of each channel's "
        "largest initial weight, clamp bound 256 times it), no size term; stored and timed as plain float32 "
        "layers.",
        f"- unsafe / SGSC: bits learnable from {s['init_bits']:g}, size term gamma {s['gamma']:g}; unsafe has "
        "lambda 0 and no restore (it still removes zero-bit channels); SGSC adds the preservation loss, restore "
        "and pruning after safe checks. The second unsafe row is the same loop at gamma "
        f"{s['sized_unsafe_gamma']:g}, chosen from file sizes (not accuracy) so that its files are about as large "
        "as SGSC's.",
        "- post-training int8/int4: per-channel symmetric scale max|w| / (2^(b-1) - 1) of the final float model, "
        "round to nearest, no data.",
        "- fixed-bit QAT 8/4/2: the same calibration, then fine-tuning of weights and exponents with bits frozen.",
        "- magnitude pruning 50% / 80%: global L1 unstructured pruning (torch.nn.utils.prune) raised along the "
        "cubic schedule of Zhu & Gupta over the first 75% of the fine-tuning steps (8 updates), the mask fixed "
        "for the last 25%, then per-channel int8 calibration.",
        "",
        "Every compressed model is a packed file (docs/FORMAT.md): each group at its smallest width, and a group "
        "whose codes are mostly zero (magnitude pruning, or many small weights at low bits) as a bitmask and its "
        "nonzero codes when that is smaller.",
        "",
    ]


def _extra_table(result: dict, group: str, references: tuple[tuple[str, dict], ...] = ()) -> list[str]:
    """The first seed's ``group`` runs, after the ``(label, row)`` references they are read against."""
    first = result["seeds"][0]
    rows = [*references, *((r["name"], r) for r in first.get("extra", []) if r["group"] == group)]
    lines = ["| variant | test accuracy (%) | val accuracy (%) | bytes on disk | % of float32 | bits/weight "
             "| conv channels kept |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {100 * r['test_accuracy']:.2f} | {100 * r['val_accuracy']:.2f} | {r['file_bytes']} "
                     f"| {r['pct_of_float']:.1f} | {r['average_bits']:.2f} | {r['channels']} |")
    return lines + [""]


def _single_seed_scale(result: dict) -> list[str]:
    """How far single runs move on their own: SGSC's spread over the seeds of Table I."""
    if len(result["seeds"]) < 2 or not result["seeds"][0].get("extra"):
        return []
    sgsc = result["table"]["sgsc"]
    return [f"The ablations and the sweep below are single runs on seed {result['seeds'][0]['seed']}. For scale, SGSC "
            f"alone spreads over the {len(result['seeds'])} seeds of Table I by "
            f"{100 * sgsc['test_accuracy']['std']:.2f} points of test accuracy, "
            f"{100 * sgsc['val_accuracy']['std']:.2f} of validation accuracy and {sgsc['file_bytes']['std']:.0f} bytes "
            "(standard deviations): differences between single runs smaller than that are not evidence.", ""]


def _rounding_verdict(result: dict) -> list[str]:
    first = result["seeds"][0]
    main_mode = result["settings"]["rounding"]
    runs = {main_mode: first["methods"]["sgsc"]}
    runs.update({r["name"]: r for r in first.get("extra", []) if r["group"] == "rounding"})
    if len(runs) < 2:
        return []
    best = max(runs, key=lambda mode: (runs[mode]["val_accuracy"], -runs[mode]["file_bytes"]))
    described = ", ".join(f"{mode}: {100 * r['val_accuracy']:.2f}% val at {r['file_bytes']} bytes"
                          for mode, r in runs.items())
    return [f"Rounding evidence (SGSC, seed {first['seed']}, judged on the validation split): {described}; "
            f"higher validation accuracy: **{best}**.", ""]


def _robustness(result: dict) -> list[str]:
    rob = result["seeds"][0].get("robustness")
    if not rob:
        return []
    keys = list(next(iter(rob["models"].values())))
    lines = [
        f"### Robustness (seed {rob['seed']}, first {rob['examples']} test examples)",
        "",
        f"Accuracy (%) of each loaded model under Gaussian input noise (sigma in pixel units of [0, 1] images), "
        f"FGSM and PGD ({rob['pgd_steps']} steps of 2.5 eps / steps, no random start) at L-infinity radius eps "
        "(pixel units), attacking each model with its own gradients.",
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, values in rob["models"].items():
        lines.append(f"| {result['methods'][name]} | " + " | ".join(f"{100 * values[k]:.1f}" for k in keys) + " |")
    return lines + ["", *_attack_verdict(result, rob)]


def _attack_verdict(result: dict, rob: dict) -> list[str]:
    """Whether compressed models are harder to attack than the float one (the seed study's finding)."""
    models = rob["models"]
    attacks = [key for key in next(iter(models.values())) if key.startswith(("fgsm", "pgd"))]
    if "float" not in models or not attacks:
        return []

    def mean_under_attack(name: str) -> float:
        return 100 * sum(models[name][key] for key in attacks) / len(attacks)

    reference = mean_under_attack("float")
    differences = {name: mean_under_attack(name) - reference for name in models if name != "float"}
    # the largest binomial standard error of one column (p = 0.5); columns share their examples, so
    # averaging them does not shrink it much
    scale = 100 * (0.25 / rob["examples"]) ** 0.5
    harder = [name for name, d in differences.items() if d > 2 * scale]
    easier = [name for name, d in differences.items() if d < -2 * scale]

    def named(names: list[str]) -> str:
        return ", ".join(f"{result['methods'][n]} ({differences[n]:+.1f})" for n in names)

    listed = "; ".join(f"{result['methods'][n]}: {d:+.1f}" for n, d in sorted(differences.items(), key=lambda x: -x[1]))
    if harder:
        finding = f"harder to attack than the float model: {named(harder)}"
    else:
        finding = "no compressed model is harder to attack than the float one (the seed study's finding does not show)"
    if easier:
        finding += f"; easier: {named(easier)}"
    return [f"Harder to attack? Mean accuracy over the {len(attacks)} FGSM and PGD columns: float "
            f"{reference:.1f}%, and in points against it: {listed}. One column's binomial standard error on "
            f"{rob['examples']} examples is at most {scale:.1f} points, so differences smaller than {2 * scale:.1f} "
            f"points are not evidence. On this evidence {finding}.", ""]


def markdown(result: dict, results_dir: Path, output: Path) -> str:
    """The Table I section of RESULTS.md from ``vision.json``; the plot is linked relative to ``output``."""
    if not isinstance(result, dict) or result.get("experiment") != "vision":
        raise ValueError("result must be the content of vision.json (experiment 'vision')")
    first = result["seeds"][0]
    plot = Path(os.path.relpath(results_dir / result["plot"], output.resolve().parent)).as_posix()
    methods = first["methods"]
    sgsc_reference = ("all three criteria (the SGSC row)", methods["sgsc"])
    rounding_reference = (f"{result['settings']['rounding']} (the SGSC row)", methods["sgsc"])
    safety_references = (
        ("neither (the unsafe row)", methods["unsafe"]),
        ("both (the SGSC row)", methods["sgsc"]),
        (f"neither, gamma {result['settings']['sized_unsafe_gamma']:g} (the sized unsafe row)", methods["unsafe_sized"]),
    )
    lines = ["## Table I: paper CNN (vision)", "", *_setup(result), *_main_table(result), *_targets(result),
             *_accuracy_reach(result), *_method_notes(result), *_single_seed_scale(result)]
    extra_groups = {r["group"] for r in first.get("extra", [])}
    if "rounding" in extra_groups:
        lines += [f"### Ablation: rounding (SGSC, seed {first['seed']})", "",
                  *_extra_table(result, "rounding", (rounding_reference,)), *_rounding_verdict(result)]
    if "preservation" in extra_groups:
        lines += [f"### Ablation: preservation criterion (SGSC, seed {first['seed']}, same set size)", "",
                  *_extra_table(result, "preservation", (sgsc_reference,))]
    if "safety" in extra_groups:
        lines += [f"### Ablation: the two halves of SGSC's safety (seed {first['seed']}, gamma "
                  f"{result['settings']['gamma']:g} unless named)", "",
                  "Restore alone is SGSC with lambda 0; the preservation loss alone is SGSC without restore.", "",
                  *_extra_table(result, "safety", safety_references)]
    lines += [f"### Accuracy vs on-disk bytes (gamma sweep of SGSC and unsafe on seed {first['seed']})", ""]
    if "sweep" in extra_groups:
        lines += _extra_table(result, "sweep")
    lines += [f"![accuracy vs bytes]({plot})", "", *_robustness(result)]
    return "\n".join(lines)


def _choice_reason(choice: dict) -> str:
    if choice["within_tolerance"]:
        return ""
    if choice["within_size"]:
        return (f" (no run within {VISION_ACCURACY_POINTS:g} points; the most accurate at <= {VISION_SIZE_PERCENT:g}% "
                "of the float bytes)")
    return f" (no run within {VISION_ACCURACY_POINTS:g} points; the most accurate)"


def tuning_markdown(result: dict) -> str:
    """How SGSC's gamma and quant_lr were chosen, from ``vision_tuning.json`` (validation split only)."""
    if not isinstance(result, dict) or result.get("experiment") != "vision-tuning":
        raise ValueError("result must be the content of vision_tuning.json (experiment 'vision-tuning')")
    s, base, choice = result["settings"], result["float"], result["choice"]
    lines = [
        f"### Tuning SGSC on the validation split (seed {result['seed']})",
        "",
        f"Float model after {s['float_steps'] + s['steps']} steps: {100 * base['val_accuracy']:.2f}% validation "
        f"accuracy, {base['file_bytes']} bytes. Every run uses a {s['lr_schedule']} learning-rate "
        f"schedule over its own steps, classifier groups per {s['head_groups']}. SGSC trains the "
        f"given steps from its step-{s['float_steps']} snapshot; rule: the smallest "
        f"file within {VISION_ACCURACY_POINTS:g} points of the float validation accuracy, else the most accurate file of "
        f"at most {VISION_SIZE_PERCENT:g}% "
        "of the float bytes, else the most accurate. Measured on "
        f"{result['meta']['machine']}, commit `{result['meta']['commit']}`. Reproduce: `{result['command']}`",
        "",
        "| gamma | quant_lr | exponent lr | steps | val accuracy (%) | bytes on disk | % of float32 | bits/weight "
        "| conv channels kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        exponent_lr = r["exponent_lr"] or r["quant_lr"]  # None: exponents trained at quant_lr
        lines.append(f"| {r['gamma']:g} | {r['quant_lr']:g} | {exponent_lr:g} | {r['steps']} | {100 * r['val_accuracy']:.2f} "
                     f"| {r['file_bytes']} | {100 * r['file_bytes'] / base['file_bytes']:.1f} "
                     f"| {r['average_bits']:.2f} | {r['channels']} |")
    chosen_exponent_lr = choice["exponent_lr"] or choice["quant_lr"]
    lines += ["", f"Chosen: gamma {choice['gamma']:g}, quant_lr {choice['quant_lr']:g}, exponent lr {chosen_exponent_lr:g}"
              + _choice_reason(choice) + ".", ""]
    return "\n".join(lines)


def _sweep_points(result: dict, method: str) -> list[tuple[int, float]]:
    """(bytes, accuracy) of ``method`` at every gamma on the first seed, sorted by bytes."""
    first = result["seeds"][0]
    # the sized unsafe run is one more gamma of the unsafe loop; SGSC has no sized twin
    rows = [first["methods"][name] for name in (method, f"{method}_sized") if name in first["methods"]]
    points = [(row["file_bytes"], row["test_accuracy"]) for row in rows]
    points += [(row["file_bytes"], row["test_accuracy"]) for _, row in sweep_rows(first, method)]
    return sorted(points)


def pareto_plot(result: dict, path: str | Path) -> Path:
    """Test accuracy against on-disk bytes: every method's mean +- std over seeds, and the gamma sweeps."""
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "experiments").FigureCanvasAgg
    Figure = require("matplotlib.figure", "experiments").Figure

    figure = Figure(figsize=(11, 5))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    # eleven methods outrun the ten-colour cycle; black extends it, and a marker of its own keeps each apart
    palette = [f"C{i}" for i in range(10)] + ["black"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(result["methods"])}
    markers = dict(zip(result["methods"], itertools.cycle("osDv^<>phXP8d")))
    markers["sgsc"] = "*"
    for method in ("sgsc", "unsafe"):
        points = _sweep_points(result, method)
        if len(points) > 1:
            axis.plot(*zip(*points), linestyle=":", color=colors[method], alpha=0.6,
                      label=f"{method}, gamma sweep (seed {result['seeds'][0]['seed']})")
    for name, label in result["methods"].items():
        row = result["table"][name]
        axis.errorbar(row["file_bytes"]["mean"], row["test_accuracy"]["mean"], xerr=row["file_bytes"]["std"],
                      yerr=row["test_accuracy"]["std"], marker=markers[name], capsize=3,
                      markersize=11 if name == "sgsc" else 6, color=colors[name], linestyle="none", label=label)
    axis.set_xscale("log")
    axis.set_xlabel("on-disk bytes of the exported file (log scale)")
    axis.set_ylabel("test accuracy")
    data_name = Path(result["seeds"][0]["data"]["source"]).name  # the data set's folder, not the whole path
    axis.set_title(f"{data_name}: accuracy vs size ({len(result['seeds'])} seeds)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, never over them
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path
