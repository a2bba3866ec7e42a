"""What format 3's sparse groups cost and save: sgsc.export.codec against the dense layout of format 2.

One layer of ``--rows`` x ``--cols`` codes, one group per row, every group at ``--width`` bits,
with a fraction ``--sparsity`` of its codes zero (at random positions: magnitude pruning leaves no
structure). Per sparsity, side by side on the same codes in one run:

* ``codec``: :func:`sgsc.export.codec.encode` / :func:`sgsc.export.codec.decode`, which store a group as a
  bitmask plus its nonzero codes when that is smaller (format 3);
* ``dense``: ``ops.pack`` / ``ops.unpack`` of every code at its width (format 2, and format 3's
  dense groups): the bandwidth-bound floor the codec's bookkeeping adds to.

Prints bytes (and % of the dense layout), medians over ``--repeats`` and the codec's time as a
multiple of the dense one, and writes ``bench/results/codec_<device>_<commit>.json``.

    python bench/bench_codec.py                                   # 4096x4096 at 4 bits
    python bench/bench_codec.py --rows 1024 --cols 1024 --width 2 --sparsity 0 0.5 0.9
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from bench_bitpack import commit, timed

import sgsc
from sgsc.export import codec, ops


def make_codes(rows: int, cols: int, width: int, sparsity: float, seed: int) -> torch.Tensor:
    """Nonzero codes uniform in the width's range, then a ``sparsity`` fraction of them set to zero."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    values = torch.randint(lo, hi, (rows, cols), generator=gen, dtype=torch.int32)
    values[values >= 0] += 1  # [lo, hi] without zero, so the sparsity is exactly what was asked
    zero = torch.rand(rows, cols, generator=gen) < sparsity
    return values.masked_fill(zero, 0)


def measure(codes: torch.Tensor, width: int, repeats: int) -> list[dict]:
    widths = torch.full((codes.shape[0],), width, dtype=torch.uint8)
    stream, width_bytes = codec.encode(codes, widths)
    packed = ops.pack(codes, widths)
    if not torch.equal(codec.decode(stream, width_bytes, 1, codes.shape[1]), codes):
        raise AssertionError("codec.decode does not round-trip codec.encode")
    if not torch.equal(ops.unpack(packed, widths, 1, codes.shape[1]), codes):
        raise AssertionError("ops.unpack does not round-trip ops.pack")
    sparse_groups = int(codec.split_width_bytes(width_bytes)[1].sum())
    timings = {
        ("codec", "encode"): timed(lambda: codec.encode(codes, widths), repeats),
        ("codec", "decode"): timed(lambda: codec.decode(stream, width_bytes, 1, codes.shape[1]), repeats),
        ("dense", "encode"): timed(lambda: ops.pack(codes, widths), repeats),
        ("dense", "decode"): timed(lambda: ops.unpack(packed, widths, 1, codes.shape[1]), repeats),
    }
    sizes = {"codec": stream.numel(), "dense": packed.numel()}
    return [{"layout": layout, "op": op, "bytes": sizes[layout], "sparse_groups": sparse_groups if layout == "codec" else 0,
             "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
            for (layout, op), times in timings.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--width", type=int, default=4, help="bits of every group, 1..32 (default 4)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.95])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if not 1 <= args.width <= codec.MAX_WIDTH:
        parser.error(f"--width must be 1..{codec.MAX_WIDTH}, got {args.width}")
    if not all(0.0 <= s < 1.0 for s in args.sparsity):
        parser.error(f"--sparsity values must lie in [0, 1), got {args.sparsity}")

    print(f"sgsc {sgsc.__version__} @ {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rows}x{args.cols} codes at {args.width} bits, one group per row; {args.repeats} repeats\n")
    print(f"{'sparsity':>8} {'layout':<6} {'bytes':>10} {'% dense':>8} {'sparse groups':>13} "
          f"{'encode ms':>10} {'decode ms':>10} {'x dense enc':>11} {'x dense dec':>11}")
    results = []
    for sparsity in args.sparsity:
        rows = measure(make_codes(args.rows, args.cols, args.width, sparsity, args.seed), args.width, args.repeats)
        for row in rows:
            row["sparsity"] = sparsity
        results += rows
        by = {(r["layout"], r["op"]): r for r in rows}
        for layout in ("codec", "dense"):
            enc, dec = by[(layout, "encode")], by[(layout, "decode")]
            ratios = (f"{enc['median_s'] / by[('dense', 'encode')]['median_s']:11.1f} "
                      f"{dec['median_s'] / by[('dense', 'decode')]['median_s']:11.1f}") if layout == "codec" else ""
            print(f"{sparsity:8.2f} {layout:<6} {enc['bytes']:10d} {100 * enc['bytes'] / by[('dense', 'encode')]['bytes']:7.1f}% "
                  f"{enc['sparse_groups']:13d} {1e3 * enc['median_s']:10.1f} {1e3 * dec['median_s']:10.1f} {ratios}")

    device = f"cpu-{platform.machine()}-{torch.get_num_threads()}t"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"codec_{device}_{commit()}_{args.rows}x{args.cols}_w{args.width}.json"
    path.write_text(json.dumps({"device": device, "commit": commit(), "args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
