"""Per-call cost of the packed runtime on small layers, where fixed costs decide (one thread, medians).

* ``op``: ``sgsc::packed_linear`` alone on a layer of uniform 4-bit rows and on one of mixed widths 1-7
  (the cost of a layer with several widths against one with a single width), 16 batch rows;
* ``module``: a 16-token decoder call ``(1, 16, K)`` through ``nn.Linear`` (float32), ``PackedLinear``
  (the fused kernel's tiles) and ``PackedStreamLinear`` (the file's stream, dequantized per call);
* ``dequantize``: a convolution's weight rebuilt from the tiles (``sgsc::packed_dequantize_out``) and
  from the stream (``sgsc::unpack_dequantize_out``), against a float32 copy of the same bytes.

    python bench/bench_packed_calls.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sgsc.nn.packed import PackedLinear, PackedStreamLinear
from sgsc.ops import functional
from sgsc.ops import packed as packed_ops
from sgsc.ops.spec import minimal_widths


def median_us(fn, calls: int) -> float:
    for _ in range(min(200, calls)):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def random_codes(rows: int, cols: int, mixed: bool, seed: int) -> torch.Tensor:
    """Codes of uniform 4-bit rows, or of rows whose widths are drawn from 1..7, each using its width fully."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(1, 8, (rows,), generator=gen) if mixed else torch.full((rows,), 4)
    half = (1 << (bits - 1)).unsqueeze(1)
    return ((torch.rand(rows, cols, generator=gen) * 2 * half).floor() - half).to(torch.int32)


def op_rows(calls: int) -> list[str]:
    lines = []
    for rows, cols in [(64, 64), (256, 64), (64, 256), (512, 512)]:
        x = torch.randn(16, cols)
        cost = {}
        for mixed in (False, True):
            weight = packed_ops.pack_weight(random_codes(rows, cols, mixed, 0), torch.full((rows,), 2.0**-4))
            tensors = weight.tensors()
            cost[mixed] = median_us(lambda: torch.ops.sgsc.packed_linear(x, *tensors, rows, None), calls)
        lines.append(f"| op | {rows}x{cols}, 16 rows | uniform 4 bits {cost[False]:.1f} | mixed 1-7 {cost[True]:.1f} "
                     f"| {cost[True] / cost[False]:.2f}x |")
    return lines


def module_rows(calls: int) -> list[str]:
    lines = []
    for rows, cols in [(64, 64), (256, 64), (64, 256)]:
        codes, scales, bias = random_codes(rows, cols, True, 1), torch.full((rows,), 2.0**-4), torch.randn(rows)
        linear = torch.nn.Linear(cols, rows)
        tiles = PackedLinear.from_codes(codes, scales, bias)
        stream = PackedStreamLinear(codes, scales, bias, rows, cols)
        x = torch.randn(1, 16, cols)
        cost = [median_us(lambda layer=layer: layer(x), calls) for layer in (linear, tiles, stream)]
        lines.append(f"| module | {rows}x{cols}, (1, 16, {cols}) | nn.Linear {cost[0]:.1f} | PackedLinear {cost[1]:.1f} "
                     f"| PackedStreamLinear {cost[2]:.1f} |")
    return lines


def dequantize_rows(calls: int) -> list[str]:
    lines = []
    for rows, cols in [(64, 576), (256, 2304), (512, 4608)]:
        codes, scales = random_codes(rows, cols, True, 2), torch.full((rows,), 2.0**-4)
        weight = packed_ops.pack_weight(codes, scales)
        widths = minimal_widths(codes).to(torch.uint8)
        stream = functional.pack(codes, widths)
        out, source = torch.empty(rows, cols), torch.randn(rows, cols)
        cost = [
            median_us(lambda: torch.ops.sgsc.packed_dequantize_out(*weight.tensors(), rows, cols, out), calls),
            median_us(lambda: torch.ops.sgsc.unpack_dequantize_out(stream, widths, scales, 1, cols, out), calls),
            median_us(lambda: out.copy_(source), calls),
        ]
        lines.append(f"| dequantize | {rows}x{cols} | tiles {cost[0]:.0f} | stream {cost[1]:.0f} "
                     f"| float32 copy {cost[2]:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per row (the dequantize rows take 1/20)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with torch.inference_mode():
        lines = ["| what | layer | median us | median us | |", "|---|---|---|---|---|"]
        lines += op_rows(args.calls) + module_rows(args.calls) + dequantize_rows(max(1, args.calls // 20))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
