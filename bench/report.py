"""Render benchmark JSON files (from bench/bench_*.py) as the markdown tables of bench/RESULTS.md.

    python bench/report.py bench/results/fake_quantize-cpu-<commit>.json [...] > table.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ours(rows):
    return {(r["shape"], r["pass"]): r for r in rows if r["provider"].startswith("ours")}


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    ours = _ours(rows)
    lines = [
        f"**{meta['device']}**, torch {meta['torch']}, sgsc {meta['sgsc']} at commit `{meta['commit']}`"
        + (f", {meta['note']}" if meta.get("note") else ""),
        "",
        "| shape | pass | provider | median (us) | IQR (us) | GB/s | % of copy | ours is faster by |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mine = ours.get((r["shape"], r["pass"]))
        speedup = "" if mine is None or r is mine or r["provider"].startswith(("copy", "floor")) else f"{r['median_us'] / mine['median_us']:.2f}x"
        pct = "" if r["pct_of_copy_bandwidth"] is None else f"{r['pct_of_copy_bandwidth']:.0f}%"
        lines.append(
            f"| {r['shape']} | {r['pass']} | {r['provider']} | {r['median_us']:.1f} | {r['iqr_us']:.1f} "
            f"| {r['gb_per_s']:.2f} | {pct} | {speedup} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by bench/bench_*.py")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    print("\n".join(render(p) for p in args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
