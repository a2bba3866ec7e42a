"""The frontier's section of RESULTS.md: each model's settings, the budget table with its verdicts, the
plot, the contract table and the one run against the sweep, from :func:`sgsc.experiments.frontier.run`'s
record."""

from __future__ import annotations

import statistics

from sgsc.experiments.frontier import LABELS, SGSC_TERMS
from sgsc.experiments.frontier_models import TITLES


def _processes(meta: dict) -> str:
    if "workers" not in meta:  # written before the record said how many processes ran at once
        return ""
    return f"{meta['workers']} process(es) of {meta['worker_threads']} thread(s), "


def _cell(stats: dict) -> str:
    if stats.get("mean") is None:
        return "not reached"
    half = stats.get("ci95")
    return f"{100 * stats['mean']:.2f}" + ("" if half is None else f" ± {100 * half:.2f}")


def _float_training(result: dict) -> str:
    """Whether the float model converged, from its training loss curve (recorded for ResNet-20)."""
    curves = [seed.get("float_training", {}).get("loss_curve") for seed in result["seeds"]]
    if not all(curves):
        return ""
    mean = [statistics.fmean(values) for values in zip(*curves)]
    steps = result["seeds"][0]["float_training"]["steps"]
    window = result["seeds"][0]["rows"]["float"]["curve_steps"]  # steps each point of the curve averages
    last = mean[-3:]
    falling = len(mean) >= 2 and mean[-1] < 0.98 * mean[-2]
    return (f"The float model trains {steps} steps (batch {result['settings']['batch_size']}), what this CPU "
            f"allowed; its training loss per {window} steps (mean over seeds) went {mean[0]:.3f} at the start, "
            f"then {', '.join(f'{v:.3f}' for v in last)} in the last {len(last) * window} steps: "
            f"{'still falling, so it had not converged' if falling else 'flat at the end'}. ")


def markdown(result: dict) -> str:
    """The frontier section of RESULTS.md."""
    s, summary = result["settings"], result["summary"]
    budgets = [f"{b:g}" for b in s["budgets"]]
    model = s.get("model", "paper_cnn")
    lines = [
        "## Accuracy against bytes: frontiers over seeds, and the contract"
        + ("" if model == "paper_cnn" else f" ({TITLES[model]})"),
        "",
        f"{TITLES[model]} on {result['seeds'][0]['data']['source']}, seeds {', '.join(map(str, s['seeds']))}: a float model "
        f"per seed ({s['float_steps']} steps, then {s['steps']} more for the float and PTQ rows); from its "
        f"snapshot every method trains {s['steps']} steps (batch {s['batch_size']}, Adam {s['lr']:g} / "
        f"{s['quant_lr']:g} for bits and exponents, {s['lr_schedule']}). SGSC and unsafe at gammas "
        f"{', '.join(f'{g:g}' for g in s['gammas'])}; SGSC with the guard contract at max_drop {s['max_drop']:g} "
        f"(a 10% guard held out of the training data, checks every {s['k']} steps, "
        f"{s.get('preservation_batch', 32)} preservation examples per step, a rollback after "
        f"{s.get('patience', 2)} failed checks in a row) and each preservation term "
        f"({', '.join(s.get('terms', SGSC_TERMS.values()))}). {_float_training(result)}"
        "Every number is the test accuracy of the exported file loaded back; bytes are "
        f"% of the float32 file. Machine: {result['meta']['machine']}, {_processes(result['meta'])}"
        f"{result['meta']['wall_seconds'] / 60:.0f} minutes, commit `{result['meta']['commit']}`. "
        f"Reproduce: `{result['command']}`.",
        "",
        f"Test accuracy (%) on each method's frontier at a budget, mean ± 95% interval over "
        f"{len(result['seeds'])} seeds (\"not reached\": a seed has no file that small):",
        "",
        "| method | " + " | ".join(f"{b}% of float32" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets)]
    for family in summary["table"]:
        lines.append(f"| {LABELS[family]} | " + " | ".join(_cell(summary["table"][family][b]) for b in budgets) + " |")
    lines.append("")
    for budget in budgets:
        v = summary["verdicts"][budget]
        margin = "n/a" if v["margin_points"] is None else f"{v['margin_points']:+.2f} points"
        lines.append(f"- {budget}%: best SGSC ({LABELS.get(v['sgsc'], '-')}) against the best other "
                     f"({LABELS.get(v['rival'], '-')}): {margin} ({'met' if v['met'] else 'missed'}: >= +0.3)")
    lines += ["", f"Target (SGSC ahead by >= 0.3 points at >= 2 of {len(budgets)} budgets): "
              f"{'met' if summary['target_met'] else 'missed'}.", "",
              f"![accuracy against bytes]({result['plot']})", "",
              "The contract: each SGSC run's test-split drop from its reference (the snapshot as compression "
              "started), beside max_drop plus two standard errors of the test split:", "",
              "| seed | run | max_drop | % of float32 | test drop | max_drop + 2 SE | within | rollbacks | reference "
              "returned |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["contract"]:
        lines.append(f"| {row['seed']} | {row['run']} | {row['max_drop']:g} | {row['pct_of_float']:.1f} | "
                     f"{100 * row['test_drop']:+.2f} | {100 * (row['max_drop'] + row['two_se']):.2f} | "
                     f"{'yes' if row['within'] else 'NO'} | {row['rollbacks']} | "
                     f"{'yes' if row['reference_returned'] else 'no'} |")
    held = sum(row["within"] for row in result["contract"])
    lines += ["", f"Within the bound in {held} of {len(result['contract'])} runs.", "",
              f"One run against a sweep: SGSC at max_drop {s['one_run_max_drop']:g}, gamma {s['one_run_gamma']:g}, "
              "against unsafe's smallest file within 0.5 points of float on test from its gamma sweep:", "",
              "| seed | SGSC one run: bytes, accuracy, seconds | unsafe sweep: bytes, accuracy | sweep seconds | met |",
              "|---|---|---|---|---|"]
    for row in result["one_run"]:
        unsafe = ("none within 0.5 points" if row["unsafe_bytes"] is None
                  else f"{row['unsafe_bytes']}, {100 * row['unsafe_accuracy']:.2f}%")
        lines.append(f"| {row['seed']} | {row['one_run_bytes']}, {100 * row['one_run_accuracy']:.2f}%, "
                     f"{row['one_run_seconds']:.0f} | {unsafe} | {row['sweep_seconds']:.0f} | "
                     f"{'yes' if row['met'] else 'no'} |")
    return "\n".join(lines) + "\n"
