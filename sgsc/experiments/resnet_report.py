"""The ResNet-20 section of RESULTS.md, from ``resnet.json`` alone (:mod:`sgsc.experiments.resnet` runs it)."""

from __future__ import annotations

from sgsc.experiments.common import safety_rule
from sgsc.experiments.resnet import METHODS, QAT_BITS, QAT_QUANT_LR
from sgsc.experiments.targets import RESNET_ACCURACY_POINTS, RESNET_SIZE_PERCENT


def _pm(stats: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def _probe_text(probe: dict | None) -> str:
    if not probe:
        return ""
    return (f"; a probe at quant_lr {probe['quant_lr']:g} (gamma {probe['gamma']:g}, {probe['steps']} steps at a "
            f"constant rate) restored less but its bits fell more slowly ({probe['average_bits']:.2f} bits/weight, "
            f"{probe['bytes']} estimated bytes, {100 * probe['val_accuracy']:.2f}% val), so quant_lr stays "
            "at the pilots' rate")


def _pruning_notes(result: dict) -> list[str]:
    lines = []
    for name in ("unsafe", "sgsc"):
        parts = []
        for seed in result["seeds"]:
            p = seed["methods"][name]["pruning"]
            kept = sum(k["count"] for k in p["kept"])
            reasons = sorted({k["reason"] for k in p["kept"]})
            in_training = seed["methods"][name].get("groups_pruned_in_training", 0)
            parts.append(f"seed {seed['seed']}: {in_training} groups removed by the checks during training, then "
                         f"{p['zero_bit_groups']} zero-bit groups at the end, parameters (with bits and "
                         f"exponents) {p['parameters_before']} -> {p['parameters_after']}, "
                         f"{len(p['removed'])} layers cut, "
                         f"{kept} zero-bit units kept masked" + (f" ({'; '.join(reasons)})" if reasons else ""))
        lines.append(f"- {METHODS[name]}: " + "; ".join(parts) + ".")
    return lines


def markdown(result: dict) -> str:
    """The ResNet-20 section of RESULTS.md, from ``resnet.json`` alone."""
    s, meta, table = result["settings"], result["meta"], result["table"]
    first = result["seeds"][0]["data"]
    pilot = result["gamma_pilot"]
    if pilot is None:
        gamma_text = f"Gamma {s['gamma']:g} for SGSC and unsafe: the --quick preset's, not tuned."
    else:
        runs = "; ".join(f"gamma {g}: {100 * v:.2f}% val (first {pilot['val_examples']}) at {b:.0f} bytes estimated "
                         "before pruning" for g, (v, b) in pilot["runs"].items())
        gamma_text = (
            f"Gamma chosen on seed 0's validation split before the run: SGSC for {s['steps']} steps from the "
            f"{s['float_steps']}-step snapshot of seed 0 (the snapshot: {100 * pilot['float_val_accuracy']:.2f}% on "
            f"the whole validation split); {runs}. Chosen: gamma {s['gamma']:g} (as accurate, smaller), for SGSC "
            "and unsafe alike. Both pilots restored lowered bits at most safety checks of their first 200 steps (the "
            "preservation accuracy fell from 77% to 15-30% within 25 steps) and compressed only once the cosine "
            "schedule had slowed the bits" + _probe_text(pilot.get("quant_lr_probe")) + ".")
    budget = ("" if s["quick"] else ": the run is sized to about 35 minutes of this shared 2-core CPU, so it is "
              "short of convergence")
    lines = [
        "## ResNet-20 on Fashion-MNIST (public API only)",
        "",
        f"He et al.'s CIFAR ResNet-20 written with plain `nn` modules (`sgsc/experiments/resnet.py`): 3x3 stem, 3 "
        f"stages of {s['blocks']} basic block(s) at {'/'.join(map(str, s['widths']))} channels, 1x1-conv + BatchNorm "
        f"projection shortcuts where a stage starts (option B), global average pooling, linear classifier; "
        f"{result['float_parameters']} parameters, {'x'.join(map(str, first['input']))} input. Nothing comes from "
        "the zoo trainer: float is "
        "plain PyTorch training; every compressed model goes through `sgsc.quantize_model`, `sgsc.compress`, "
        "`prune_zero_bit_units`, `sgsc.save_packed` and `sgsc.load_packed(path, model=resnet20())`.",
        "",
        f"Data: {first['source']} ({first['train']} train / {first['val']} val / {first['test']} test); validation "
        f"accuracy on the first {s['val_examples']} validation examples, test accuracy on the whole test split.",
        "",
        f"Seeds {', '.join(map(str, s['seeds']))}. Float trains {s['float_steps'] + s['steps']} steps (batch "
        f"{s['batch_size']}, about {(s['float_steps'] + s['steps']) * s['batch_size'] / first['train']:.1f} epochs"
        f"{budget}) with a "
        f"snapshot at step {s['float_steps']}; unsafe, SGSC and 2-bit QAT train {s['steps']} steps from the "
        "snapshot quantized at "
        f"{s['init_bits']:g} bits (the same total); PTQ quantizes the final float model. Adam lr {s['lr']:g} "
        f"(weights) / {s['quant_lr']:g} (bits and exponents of SGSC and unsafe) / {QAT_QUANT_LR:g} (QAT's step "
        f"sizes; its bits are frozen at {QAT_BITS}), {s['lr_schedule']} schedule over each run, gamma "
        f"{s['gamma']:g} for SGSC and unsafe, lambda {s['lambda_']:g}, safety check every {s['k']} steps, "
        f"{safety_rule(s)} (accuracy), preservation set {s['preserve_examples']} examples "
        f"chosen by the three criteria from {s['preserve_pool']} drawn from the training split.",
        "",
        gamma_text,
        "",
        f"Measured on {meta['machine']}, {meta['torch_threads']} torch thread(s) per process, {meta['workers']} "
        f"process(es); torch {meta['torch']}, sgsc {meta['sgsc']}, commit `{meta['commit']}`; finished "
        f"{meta['finished_utc']}; this invocation took {meta['wall_seconds'] / 60:.1f} min wall (methods finished "
        "in an "
        f"earlier sitting are read back, not rerun); the methods' own time, summed over seeds: "
        f"{meta['method_seconds'] / 60:.1f} min.",
        "",
        f"Reproduce: `{result['command']}` (resumable: finished methods are read back from "
        "`resnet-seed<N>/<method>.json`).",
        "",
        "| method | test accuracy (%) | val accuracy (%) | bytes on disk | % of float32 | parameters after pruning "
        "| bits/weight | latency b=256 (ms) | training (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in result["methods"].items():
        row = table[name]
        lines.append(
            f"| {label} | {_pm(row['test_accuracy'], 100)} | {_pm(row['val_accuracy'], 100)} "
            f"| {_pm(row['file_bytes'], digits=0)} | {_pm(row['pct_of_float'], digits=1)} "
            f"| {_pm(row['parameters'], digits=0)} | {_pm(row['average_bits'])} "
            f"| {_pm(row['latency_batch256_ms'], digits=1)} | {_pm(row['train_seconds'], digits=1)} |")
    lines += [
        "",
        "Means ± sample standard deviations over seeds. Every number is measured on the model loaded back from its "
        "file (float: float32 safetensors; others: sgsc packed file). Bits/weight: packed code bytes per quantized "
        "weight. Latency: median of batch-256 forwards on the CPU, every file of every seed timed side by side "
        f"({s['latency_rounds']} round-robin passes, {s['latency_repeats']} calls each), after training. Training "
        "time includes SGSC's preservation scoring; seeds ran in parallel processes on a shared CPU, so times are "
        "indicative.",
        "",
        "Physical pruning (by the safety checks during training, then `prune_zero_bit_units` before saving; the "
        "parameter counts are those of the final pass):",
        "",
        *_pruning_notes(result),
        "",
        *_target_lines(result),
    ]
    return "\n".join(lines) + "\n"


def _target_lines(result: dict) -> list[str]:
    t = result["targets"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    lines = [
        "Targets (means over seeds):",
        "",
        f"- SGSC within {RESNET_ACCURACY_POINTS:g} points of float: {verdict(t['accuracy_met'])} "
        f"({t['accuracy_gap_points']:+.2f} points: {100 * t['sgsc_accuracy']:.2f}% vs "
        f"{100 * t['float_accuracy']:.2f}%).",
        f"- at <= {RESNET_SIZE_PERCENT:g}% of the float32 bytes: {verdict(t['size_met'])} ({t['pct_of_float']:.2f}%, "
        f"{t['sgsc_bytes']:.0f} of {t['float_bytes']:.0f} bytes).",
    ]
    for other in ("ptq_int4", "qat_2"):
        c = t["versus"][other]
        lines.append(
            f"- ahead of {METHODS[other]} at equal or smaller size: {verdict(c['met'])} (SGSC "
            f"{100 * t['sgsc_accuracy']:.2f}% at {t['sgsc_bytes']:.0f} bytes, {other} {100 * c['accuracy']:.2f}% at "
            f"{c['bytes']:.0f} bytes: {c['accuracy_points']:+.2f} points, size ratio {c['size_ratio']:.2f}).")
    sgsc_rows = [seed["methods"]["sgsc"] for seed in result["seeds"]]
    plain = sum(r["plain_bytes"] for r in sgsc_rows) / len(sgsc_rows)
    metadata_bytes = sum(r["group_metadata_bytes"] for r in sgsc_rows) / len(sgsc_rows)
    packed = sum(r["packed_bytes"] for r in sgsc_rows) / len(sgsc_rows)
    header = sum(r["file_bytes"] for r in sgsc_rows) / len(sgsc_rows) - packed - metadata_bytes - plain
    lines += [
        "",
        f"Where SGSC's bytes go (mean over seeds): {packed:.0f} bytes of packed codes, {metadata_bytes:.0f} of "
        f"per-channel widths and scales, {plain:.0f} of float32 tensors stored as they are (BatchNorm weights, "
        f"biases and running statistics, the classifier bias), {header:.0f} of header (the architecture record "
        "of every state entry that `load_packed(model=)` checks, CRCs, tensor index).",
    ]
    if not t["size_met"]:
        restores = ", ".join(f"{r.get('restores', 0)} of {r.get('checks', 0)}" for r in sgsc_rows)
        bits = ", ".join(f"{r['average_bits']:.2f}" for r in sgsc_rows)
        zero = ", ".join(str(r["pruning"]["zero_bit_groups"]) for r in sgsc_rows)
        lines.append(f"SGSC's bits per weight: {bits}; its checks restored lowered bits at {restores} checks (per "
                     "seed), so the bits fell mainly once the cosine schedule had slowed them; zero-bit channels to "
                     f"prune: {zero}.")
        budget = RESNET_SIZE_PERCENT / 100 * t["float_bytes"]
        fixed = plain + metadata_bytes + header
        lines.append(f"The size target allows {budget:.0f} bytes; the float32 BatchNorm state, group metadata and "
                     f"header alone take {fixed:.0f}, so the codes would have to fit {budget - fixed:.0f} bytes "
                     f"({8 * (budget - fixed) / result['float_parameters']:.2f} bits per parameter of the float model; "
                     f"SGSC's codes take {packed:.0f}).")
    if not t["accuracy_met"]:
        checks = ", ".join(f"{r.get('restores', 0)} of {r.get('checks', 0)}" for r in sgsc_rows)
        lines.append(f"SGSC's accuracy gap: its safety checks undid compression at {checks} checks (per seed); "
                     f"the rule ({safety_rule(result['settings'])}) bounds the drop there, not on the test "
                     "split, and after the last one the short cosine schedule leaves few steps to recover.")
    return lines + [""]
