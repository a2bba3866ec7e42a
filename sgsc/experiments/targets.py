"""Every target the experiments are judged against, and the rules that judge them.

The numbers are the issues' targets; the functions read only the results' dicts, so the report and
the runs apply the same rules.
"""

from __future__ import annotations

# Table I (vision): SGSC within this many points of float test accuracy, at this % of the float32 bytes
VISION_ACCURACY_POINTS = 0.3
VISION_SIZE_PERCENT = 10.0
# files within 5% of each other's bytes count as equal size
EQUAL_SIZE = 0.05
# Table II (language): SGSC test loss at most this many nats/char above float, at this % of the float bytes
LANGUAGE_LOSS_MARGIN = 0.02
LANGUAGE_SIZE_PERCENT = 25.0


def within_accuracy(gap_points: float) -> bool:
    """Whether an accuracy gap (points, negative when below float) meets the vision target."""
    return round(gap_points, 9) >= -VISION_ACCURACY_POINTS  # exactly 0.3 points meets it, float noise aside


def sweep_prefix(method: str) -> str:
    return f"{method} gamma="


def sweep_rows(seed_result: dict, method: str) -> list[tuple[float, dict]]:
    """``(gamma, row)`` of each gamma-sweep run of ``method`` in a first seed's extra runs."""
    prefix = sweep_prefix(method)
    return [(float(row["name"].removeprefix(prefix)), row) for row in seed_result.get("extra", [])
            if row["group"] == "sweep" and row["name"].startswith(prefix)]


def _sized_unsafe(table: dict, gamma: float) -> dict:
    """SGSC against unsafe at ``sized_unsafe_gamma``: means over every seed, and their sizes' ratio."""
    sgsc, sized = table["sgsc"], table["unsafe_sized"]
    ratio = sized["file_bytes"]["mean"] / sgsc["file_bytes"]["mean"]
    return {"gamma": gamma, "file_bytes": sized["file_bytes"]["mean"],
            "test_accuracy": sized["test_accuracy"]["mean"], "test_accuracy_std": sized["test_accuracy"]["std"],
            "size_ratio": ratio, "within_5pct": abs(ratio - 1) <= EQUAL_SIZE,
            "sgsc_minus_unsafe_points": 100.0 * (sgsc["test_accuracy"]["mean"] - sized["test_accuracy"]["mean"])}


def _first_seed_unsafe(seed_result: dict, gamma: float) -> tuple[list[dict], bool]:
    """The first seed's unsafe runs (main gamma and sweep) within 5% of its SGSC file, else the nearest."""
    sgsc = seed_result["methods"]["sgsc"]
    runs = [{"gamma": gamma, **seed_result["methods"]["unsafe"]}]
    runs += [{"gamma": swept, **row} for swept, row in sweep_rows(seed_result, "unsafe")]
    for row in runs:
        row["size_ratio"] = row["file_bytes"] / sgsc["file_bytes"]
    close = [r for r in runs if abs(r["size_ratio"] - 1) <= EQUAL_SIZE]
    compared = close or [min(runs, key=lambda r: abs(r["size_ratio"] - 1))]
    keep = ("gamma", "file_bytes", "test_accuracy", "size_ratio")
    return [{key: r[key] for key in keep} for r in compared], bool(close)


def vision_targets(table: dict, seed_result: dict, gamma: float, sized_gamma: float) -> dict:
    """The issue's targets checked on the means: SGSC vs float accuracy and size, SGSC vs unsafe at equal size.

    "Equal size" is judged on every seed with unsafe at ``sized_gamma`` when its mean file is within 5%
    of SGSC's; otherwise on the first seed's unsafe runs (main gamma and sweep) within 5% of its SGSC
    file (with none that close, the nearest is named and the comparison is not made). Either way, SGSC
    does not beat unsafe when the sized unsafe run is smaller (or within 5%) and more accurate.
    """
    gap = 100.0 * (table["sgsc"]["test_accuracy"]["mean"] - table["float"]["test_accuracy"]["mean"])
    pct = table["sgsc"]["pct_of_float"]["mean"]
    sized = _sized_unsafe(table, sized_gamma)
    first_seed, close = _first_seed_unsafe(seed_result, gamma)
    sgsc_first = seed_result["methods"]["sgsc"]["test_accuracy"]
    if sized["within_5pct"]:
        beats = sized["sgsc_minus_unsafe_points"] > 0
    else:
        beats = close and all(sgsc_first > r["test_accuracy"] for r in first_seed)
    # sized unsafe files at most 5% larger than SGSC's (or smaller) that are also more accurate beat SGSC
    # at its size, whichever runs the 5% rule compared: more bytes would not make unsafe less accurate
    sized["dominates_sgsc"] = sized["size_ratio"] <= 1 + EQUAL_SIZE and sized["sgsc_minus_unsafe_points"] < 0
    beats = beats and not sized["dominates_sgsc"]
    return {
        "accuracy_gap_points": gap,
        "accuracy_met": within_accuracy(gap),
        "pct_of_float": pct,
        "size_met": pct <= VISION_SIZE_PERCENT,
        "unsafe_sized": sized,
        "unsafe_equal_size": first_seed,
        "unsafe_within_5pct": close,
        # a smaller, more accurate sized run settles the comparison even when no run is within 5%
        "equal_size_compared": sized["within_5pct"] or close or sized["dominates_sgsc"],
        "beats_unsafe": bool(beats),
    }


def accuracy_reach(table: dict, seed_result: dict, gamma: float, sized_gamma: float) -> dict:
    """How far the accuracy target (float - 0.3 points) is from the size target (<= 10% of the float bytes).

    ``within_size``: the most accurate method of the table (means over seeds) at <= 10% of the float
    bytes. ``smallest_within_tolerance``: for SGSC and unsafe, the first seed's smallest file (main,
    sized and sweep gammas) within 0.3 points of that seed's float model, or None.
    """
    def gap(accuracy: float, reference: float) -> float:
        return 100.0 * (accuracy - reference)

    float_mean = table["float"]["test_accuracy"]["mean"]
    small = [name for name, row in table.items() if name != "float" and row["pct_of_float"]["mean"] <= VISION_SIZE_PERCENT]
    best = max(small, key=lambda name: table[name]["test_accuracy"]["mean"], default=None)
    within_size = None if best is None else {
        "method": best, "gap_points": gap(table[best]["test_accuracy"]["mean"], float_mean),
        "pct_of_float": table[best]["pct_of_float"]["mean"]}

    methods = seed_result["methods"]
    float_first = methods["float"]["test_accuracy"]
    runs = {"sgsc": [(gamma, methods["sgsc"])],
            "unsafe": [(gamma, methods["unsafe"]), (sized_gamma, methods["unsafe_sized"])]}
    smallest = {}
    for method, method_runs in runs.items():
        close = [(swept, row) for swept, row in method_runs + sweep_rows(seed_result, method)
                 if within_accuracy(gap(row["test_accuracy"], float_first))]
        swept, row = min(close, key=lambda run: run[1]["file_bytes"], default=(None, None))
        smallest[method] = None if row is None else {
            "gamma": swept, "file_bytes": row["file_bytes"], "pct_of_float": row["pct_of_float"],
            "gap_points": gap(row["test_accuracy"], float_first)}
    return {"within_size": within_size, "first_seed_float_accuracy": float_first, "smallest_within_tolerance": smallest}


def choose(rows: list[dict], float_val: float, float_bytes: int, tolerance: float = VISION_ACCURACY_POINTS / 100,
           max_pct: float = VISION_SIZE_PERCENT) -> dict:
    """The run the issue's target asks for, judged on validation.

    The smallest file whose validation accuracy is within ``tolerance`` of the float model's; with
    none that accurate, the most accurate file of at most ``max_pct`` % of the float bytes (the size
    target); with none that small either, the most accurate.
    """
    good = [r for r in rows if r["val_accuracy"] >= float_val - tolerance]
    small = [r for r in rows if 100.0 * r["file_bytes"] / float_bytes <= max_pct]
    if good:
        best = min(good, key=lambda r: r["file_bytes"])
    else:
        best = max(small or rows, key=lambda r: r["val_accuracy"])
    return {**best, "pct_of_float": 100.0 * best["file_bytes"] / float_bytes, "within_tolerance": bool(good),
            "within_size": 100.0 * best["file_bytes"] / float_bytes <= max_pct}


# ---- ResNet-20 ------------------------------------------------------------------------------

# SGSC within this many points of float test accuracy, at this % of the float32 bytes, and ahead of
# PTQ int4 and 2-bit QAT at equal (within EQUAL_SIZE) or smaller size
RESNET_ACCURACY_POINTS = 0.5
RESNET_SIZE_PERCENT = 6.0
RESNET_RIVALS = ("ptq_int4", "qat_2")


def resnet_targets(table: dict) -> dict:
    """Issue 18's ResNet-20 targets on the means over seeds of :func:`sgsc.experiments.resnet.summarize`'s table."""
    sgsc, float_ = table["sgsc"], table["float"]
    accuracy, float_accuracy = sgsc["test_accuracy"]["mean"], float_["test_accuracy"]["mean"]
    gap = 100.0 * (accuracy - float_accuracy)
    versus = {}
    for name in RESNET_RIVALS:
        other = table[name]
        ratio = sgsc["file_bytes"]["mean"] / other["file_bytes"]["mean"]
        points = 100.0 * (accuracy - other["test_accuracy"]["mean"])
        versus[name] = {"accuracy": other["test_accuracy"]["mean"], "bytes": other["file_bytes"]["mean"],
                        "size_ratio": ratio, "accuracy_points": points,
                        "met": ratio <= 1 + EQUAL_SIZE and points > 0}
    return {"float_accuracy": float_accuracy, "sgsc_accuracy": accuracy, "accuracy_gap_points": gap,
            "accuracy_met": round(gap, 9) >= -RESNET_ACCURACY_POINTS,
            "sgsc_bytes": sgsc["file_bytes"]["mean"], "float_bytes": float_["file_bytes"]["mean"],
            "pct_of_float": sgsc["pct_of_float"]["mean"],
            "size_met": sgsc["pct_of_float"]["mean"] <= RESNET_SIZE_PERCENT, "versus": versus}
