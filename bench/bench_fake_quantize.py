"""Benchmark of fake_quantize against the eager formula, torch.compile of it, PyTorch's built-in
fake-quant ops and a plain copy of the same bytes (the bandwidth limit).

    python bench/bench_fake_quantize.py [--device cpu|cuda] [--shapes 64x576,1024x1024] [--out DIR]

Prints one table per pass (forward into a preallocated output; forward+backward with gradients to
w, b and e) with the median time, its interquartile range, effective GB/s and the share of the
measured copy bandwidth, and writes the rows to DIR/fake_quantize-<device>-<commit>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

import sgsc
from sgsc.ops import native as _native
from sgsc.ops import reference

FORWARD_BYTES_PER_ELEMENT = 8  # read w, write q (float32)
TRAIN_BYTES_PER_ELEMENT = 20  # forward 8, backward: read w and grad_q, write grad_w
DEFAULT_SHAPES = {"cpu": ["64x576", "1024x1024", "4096x4096"], "cuda": ["64x576", "1024x1024", "4096x4096", "16384x8192"]}


def make_inputs(shape, device):
    rows = shape[0]
    w = torch.randn(shape, device=device)
    b = torch.full((rows,), 6.0, device=device)
    e = torch.log2(w.abs().amax(1) / 31).ceil()
    return w, b, e


def builtin_scale_zero_point(e):
    # The same per-channel grid as 6-bit codes with exponent e: scale 2^e, zero point 0.
    return torch.exp2(e), torch.zeros_like(e, dtype=torch.int32)


def forward_providers(w, b, e, out):
    scale, zero_point = builtin_scale_zero_point(e)
    compiled = torch.compile(reference.fake_quantize)
    ours_name = "ours-triton" if w.is_cuda else ("ours-cpp" if _native.available() else "ours-reference-fallback")
    return {
        ours_name: lambda: torch.ops.sgsc.fake_quantize_out(w, b, e, "nearest", out),
        "eager formula": lambda: reference.fake_quantize(w, b, e),
        "torch.compile(formula)": lambda: compiled(w, b, e),
        "torch.fake_quantize_per_channel_affine": lambda: torch.fake_quantize_per_channel_affine(
            w, scale, zero_point, 0, -32, 31
        ),
        "copy (bandwidth limit)": lambda: out.copy_(w),
    }


def train_providers(w, b, e, grad):
    scale, zero_point = builtin_scale_zero_point(e)
    w_, b_, e_ = (t.clone().requires_grad_() for t in (w, b, e))
    scale_ = scale.clone().requires_grad_()
    zp_float = zero_point.float().requires_grad_()
    compiled = torch.compile(reference.fake_quantize)
    ours_name = "ours-triton" if w.is_cuda else ("ours-cpp" if _native.available() else "ours-reference-fallback")

    def step(fn):
        def run():
            w_.grad = b_.grad = e_.grad = scale_.grad = zp_float.grad = None
            fn().backward(grad)

        return run

    return {
        ours_name: step(lambda: torch.ops.sgsc.fake_quantize(w_, b_, e_, "nearest")),
        "eager formula": step(lambda: reference.fake_quantize(w_, b_, e_)),
        "torch.compile(formula)": step(lambda: compiled(w_, b_, e_)),
        "torch._fake_quantize_learnable_per_channel_affine": step(
            lambda: torch._fake_quantize_learnable_per_channel_affine(w_, scale_, zp_float, 0, -32, 31, 1.0)
        ),
        # not a peer: one elementwise multiply through autograd, allocating its output and grad_w as a
        # training step does; no op with a gradient to w can go much below it (PyTorch's fixed cost)
        "floor: (w * 1).backward": step(lambda: w_ * 1.0),
    }


def measure(fn, device, min_run_time):
    for _ in range(3):  # warm-up, including torch.compile's first trace
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median, m.iqr


def commit_id() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads ({_native.cpu_isa()})"


def run(device: str, shapes: list[str], min_run_time: float) -> list[dict]:
    rows = []
    for spec in shapes:
        shape = tuple(int(x) for x in spec.split("x"))
        numel = shape[0] * shape[1]
        w, b, e = make_inputs(shape, device)
        out = torch.empty_like(w)
        grad = torch.randn_like(w)
        copy_time = None
        for pass_name, providers, bytes_per in (
            ("forward", forward_providers(w, b, e, out), FORWARD_BYTES_PER_ELEMENT),
            ("forward+backward", train_providers(w, b, e, grad), TRAIN_BYTES_PER_ELEMENT),
        ):
            for name, fn in providers.items():
                median, iqr = measure(fn, device, min_run_time)
                if name.startswith("copy"):
                    copy_time = median
                copy_gbps = FORWARD_BYTES_PER_ELEMENT * numel / copy_time / 1e9 if copy_time else None
                gbps = bytes_per * numel / median / 1e9
                rows.append(
                    {
                        "shape": spec,
                        "pass": pass_name,
                        "provider": name,
                        "median_us": median * 1e6,
                        "iqr_us": iqr * 1e6,
                        "gb_per_s": gbps,
                        "pct_of_copy_bandwidth": 100 * gbps / copy_gbps if copy_gbps else None,
                    }
                )
                print_row(rows[-1])
    return rows


def print_row(row):
    pct = f"{row['pct_of_copy_bandwidth']:6.1f}%" if row["pct_of_copy_bandwidth"] is not None else "     -"
    print(
        f"{row['shape']:>11} {row['pass']:>16} {row['provider']:>52} "
        f"{row['median_us']:11.1f} us ±{row['iqr_us']:8.1f} {row['gb_per_s']:8.2f} GB/s {pct}",
        flush=True,
    )


def print_speedups(rows):
    ours = {(r["shape"], r["pass"]): r for r in rows if r["provider"].startswith("ours")}
    print("\nspeed-up of ours over each provider (median time ratio, same run):")
    for r in rows:
        mine = ours.get((r["shape"], r["pass"]))
        if mine is None or r is mine or r["provider"].startswith("copy"):
            continue
        print(f"{r['shape']:>11} {r['pass']:>16} vs {r['provider']:>52}: {r['median_us'] / mine['median_us']:6.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default=None, help="comma-separated ROWSxCOLS list")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per provider")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON results")
    parser.add_argument("--note", default="", help="free text recorded with the results (e.g. allocator settings)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name, so runs of one commit under "
                        "different settings do not overwrite each other")
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",") if args.shapes else DEFAULT_SHAPES[args.device]
    meta = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "sgsc": sgsc.__version__,
        "commit": commit_id(),
        "note": args.note,
        # huge pages change the cost of every fresh output (page faults dominate on small VMs)
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
    }
    print(meta)
    rows = run(args.device, shapes, args.min_run_time)
    print_speedups(rows)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fake_quantize-{args.device}-{meta['commit']}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
