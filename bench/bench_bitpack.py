"""Throughput of sgsc.ops.pack / unpack against NumPy implementations of the same layout.

Providers, side by side on the same data in one run:

* ``ours-cpp``: the registered CPU op (C++ kernels, parallel over blocks of codes). ``unpack`` allocates
  its output; ``unpack(out=)`` writes into a reused one, which skips the page faults of a fresh
  output (on small VMs they cost more than the unpacking).
* ``numpy``: a vectorised NumPy implementation of the same layout, all groups of one width at a
  time, 8 codes (= w bytes) per block as 64-bit words with constant shifts: the algorithm of the
  C++ pack, vectorised over blocks instead of unrolled. Checked against ours byte for byte first.
* ``reference``: ``sgsc.ops.reference`` (the test oracle, written for clarity), on a slice of the groups.
* ``ours-triton``: the registered CUDA op, when a GPU is present.
* ``copy``: ``Tensor.copy_`` of the int32 codes, the measured memory bandwidth.

Reports medians over ``--repeats`` runs with the spread (min-max), codes/s, GB/s (int32 codes plus
packed bytes moved) and % of the copy bandwidth, and writes them to
``bench/results/bitpack_<device>_<commit>.json``.

    python bench/bench_bitpack.py                      # 64M codes, widths uniform in 0..8
    python bench/bench_bitpack.py --codes 4M --widths 0-32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import sgsc
from sgsc import ops
from sgsc.ops import reference

GROUP_LEN = 16384  # codes per group: e.g. 4 rows of 4096 inputs


# ---- the NumPy implementation of the layout ---------------------------------------------------


def numpy_offsets(widths: np.ndarray, group_len: int) -> np.ndarray:
    sizes = (widths.astype(np.int64) * group_len + 7) // 8
    return np.concatenate([[0], np.cumsum(sizes)])


def _code_bounds(widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = np.where(widths > 0, np.left_shift(1, np.maximum(widths, 1) - 1), 0)
    return -half, np.maximum(half - 1, 0)


def numpy_pack(ints: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """``ints``: (G, L) int32 with L a multiple of 8. All groups of one width at a time: each block of
    8 codes becomes 4 little-endian 64-bit words (the fields ORed in at bit j*w), of which the first
    w bytes are the block's bytes."""
    groups, group_len = ints.shape
    assert group_len % 8 == 0, "this NumPy implementation needs whole blocks of 8 codes"
    widths = widths.astype(np.int64)
    lo, hi = _code_bounds(widths)
    bad = ((ints < lo[:, None]) | (ints > hi[:, None])).any(axis=1)
    if bad.any():
        raise ValueError(f"group {int(np.flatnonzero(bad)[0])} holds a code outside its range")
    offsets = numpy_offsets(widths, group_len)
    out = np.empty(offsets[-1], dtype=np.uint8)
    for w in np.unique(widths[widths > 0]).tolist():
        members = np.flatnonzero(widths == w)
        fields = (ints[members].view(np.uint32) & np.uint32((1 << w) - 1)).astype(np.uint64)
        fields = fields.reshape(members.size, group_len // 8, 8)
        words = np.zeros((members.size, group_len // 8, 4), dtype=np.uint64)
        for j in range(8):
            word, shift = divmod(j * w, 64)
            words[..., word] |= fields[..., j] << np.uint64(shift)
            if shift + w > 64:  # the field straddles two words
                words[..., word + 1] |= fields[..., j] >> np.uint64(64 - shift)
        block_bytes = words.view(np.uint8)[..., :w].reshape(members.size, -1)  # little-endian host
        out[offsets[members][:, None] + np.arange(block_bytes.shape[1])] = block_bytes
    return out


def numpy_unpack(packed: np.ndarray, widths: np.ndarray, group_len: int) -> np.ndarray:
    """(G, L) int32 codes, L a multiple of 8: the inverse of :func:`numpy_pack`, block by block."""
    assert group_len % 8 == 0, "this NumPy implementation needs whole blocks of 8 codes"
    widths = widths.astype(np.int64)
    offsets = numpy_offsets(widths, group_len)
    out = np.zeros((widths.size, group_len), dtype=np.int32)
    for w in np.unique(widths[widths > 0]).tolist():
        members = np.flatnonzero(widths == w)
        blocks = np.zeros((members.size, group_len // 8, 40), dtype=np.uint8)  # w bytes, zero-padded to 5 words
        stream = packed[offsets[members][:, None] + np.arange(group_len * w // 8)]
        blocks[..., :w] = stream.reshape(members.size, group_len // 8, w)
        words = blocks.view(np.uint64)
        codes = np.empty((members.size, group_len // 8, 8), dtype=np.int32)
        top = np.uint64(64 - w)
        for j in range(8):
            word, shift = divmod(j * w, 64)
            value = words[..., word] >> np.uint64(shift)
            if shift + w > 64:
                value |= words[..., word + 1] << np.uint64(64 - shift)
            codes[..., j] = (value << top).view(np.int64) >> np.int64(64 - w)
        out[members] = codes.reshape(members.size, group_len)
    return out


# ---- timing ------------------------------------------------------------------------------------


def timed(fn, repeats: int, sync=lambda: None) -> list[float]:
    fn()  # warm-up (and first-use costs such as Triton compilation)
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def make_data(n_codes: int, widths_spec: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = (int(v) for v in widths_spec.split("-"))
    groups = max(1, n_codes // GROUP_LEN)
    gen = torch.Generator().manual_seed(seed)
    widths = torch.randint(low, high + 1, (groups,), generator=gen, dtype=torch.int32)
    w = widths.to(torch.int64)
    lo = torch.where(w > 0, -(2 ** (w.clamp(min=1) - 1)), 0)
    span = torch.where(w > 0, 2**w, 1)
    ints = (lo[:, None] + (torch.rand(groups, GROUP_LEN, generator=gen, dtype=torch.float64) * span[:, None]).long())
    return ints.to(torch.int32), widths


def parse_count(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def cpu_info() -> dict:
    """The CPU's model name and its SIMD flags (every avx*, amx*, fma, f16c, sse4* and *vnni flag of
    /proc/cpuinfo), with the level sgsc's kernels run at: recorded in every result file."""
    info = {"machine": platform.machine(), "processor": platform.processor(), "model_name": None, "flags": [],
            "cores": os.cpu_count(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model_name"] is None:
            info["model_name"] = value.strip()
        if key.strip() == "flags" and not info["flags"]:
            keep = ("avx", "amx", "fma", "f16c", "sse4", "vnni", "bf16")
            info["flags"] = sorted(f for f in value.split() if f.startswith(keep) or "vnni" in f)
    from sgsc.ops import native

    info["sgsc_cpu_isa"] = native.cpu_isa() if native.available() else None
    return info


def commit() -> str:
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return git.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", default="64M", help="number of codes (K/M/G suffixes), default 64M")
    parser.add_argument("--widths", default="0-8", help="per-group widths drawn uniformly from LOW-HIGH, default 0-8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-codes", default="2M", help="codes the (slow) reference runs on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    ints, widths = make_data(parse_count(args.codes), args.widths, args.seed)
    groups, group_len = ints.shape
    n = ints.numel()
    packed = ops.pack(ints, widths)
    packed_bytes = packed.numel()
    moved = 4 * n + packed_bytes
    print(f"sgsc {sgsc.__version__} @ {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu isa {sgsc.ops.native.cpu_isa()}")
    print(f"{n / 1e6:.1f}M codes in {groups} groups of {group_len}, widths {args.widths} "
          f"(mean {widths.float().mean():.2f} bits), {packed_bytes / 1e6:.1f} MB packed; {args.repeats} repeats\n")

    results = []

    def record(provider: str, op: str, times: list[float], codes: int = n, bytes_moved: int = moved, copy_gbps=None):
        med = statistics.median(times)
        row = {
            "provider": provider, "op": op, "codes": codes, "median_s": med, "min_s": min(times), "max_s": max(times),
            "gcodes_per_s": codes / med / 1e9, "gb_per_s": bytes_moved / med / 1e9,
        }
        if copy_gbps:
            row["pct_of_copy"] = 100 * row["gb_per_s"] / copy_gbps
        results.append(row)

    # CPU: copy bandwidth, ours, NumPy, reference.
    scratch = torch.empty_like(ints)
    copy_times = timed(lambda: scratch.copy_(ints), args.repeats)
    cpu_copy_gbps = 8 * n / statistics.median(copy_times) / 1e9
    record("copy", "copy_ int32", copy_times, bytes_moved=8 * n, copy_gbps=cpu_copy_gbps)

    np_ints, np_widths, np_packed = ints.numpy(), widths.numpy(), packed.numpy()
    assert np.array_equal(numpy_pack(np_ints, np_widths), np_packed), "numpy pack disagrees with sgsc"
    assert np.array_equal(numpy_unpack(np_packed, np_widths, group_len), np_ints), "numpy unpack disagrees"
    assert torch.equal(ops.unpack(packed, widths, 1, group_len), ints), "sgsc unpack does not round-trip"

    record("ours-cpp", "pack", timed(lambda: torch.ops.sgsc.pack(ints, widths), args.repeats), copy_gbps=cpu_copy_gbps)
    record("numpy", "pack", timed(lambda: numpy_pack(np_ints, np_widths), args.repeats), copy_gbps=cpu_copy_gbps)
    record("ours-cpp", "unpack", timed(lambda: torch.ops.sgsc.unpack(packed, widths, 1, group_len), args.repeats),
           copy_gbps=cpu_copy_gbps)
    record("ours-cpp", "unpack(out=)",
           timed(lambda: torch.ops.sgsc.unpack_out(packed, widths, 1, group_len, scratch), args.repeats),
           copy_gbps=cpu_copy_gbps)
    record("numpy", "unpack", timed(lambda: numpy_unpack(np_packed, np_widths, group_len), args.repeats),
           copy_gbps=cpu_copy_gbps)

    ref_groups = max(1, min(groups, parse_count(args.reference_codes) // group_len))
    ref_ints, ref_widths = ints[:ref_groups], widths[:ref_groups]
    ref_packed = ops.pack(ref_ints, ref_widths)
    ref_moved = 4 * ref_ints.numel() + ref_packed.numel()
    ref_repeats = max(1, min(3, args.repeats))
    record("reference", "pack", timed(lambda: reference.pack(ref_ints, ref_widths), ref_repeats),
           codes=ref_ints.numel(), bytes_moved=ref_moved, copy_gbps=cpu_copy_gbps)
    record("reference", "unpack", timed(lambda: reference.unpack(ref_packed, ref_widths, 1, group_len), ref_repeats),
           codes=ref_ints.numel(), bytes_moved=ref_moved, copy_gbps=cpu_copy_gbps)

    device = f"cpu-{platform.machine()}-{torch.get_num_threads()}t"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name().replace(" ", "-")
        d_ints, d_widths, d_packed = ints.cuda(), widths.cuda(), packed.cuda()
        assert torch.equal(torch.ops.sgsc.pack(d_ints, d_widths).cpu(), packed), "Triton pack disagrees with the CPU op"
        assert torch.equal(torch.ops.sgsc.unpack(d_packed, d_widths, 1, group_len).cpu(), ints)
        sync = torch.cuda.synchronize
        d_scratch = torch.empty_like(d_ints)
        gpu_copy = timed(lambda: d_scratch.copy_(d_ints), args.repeats * 4, sync)
        gpu_copy_gbps = 8 * n / statistics.median(gpu_copy) / 1e9
        record("copy-cuda", "copy_ int32", gpu_copy, bytes_moved=8 * n, copy_gbps=gpu_copy_gbps)
        record("ours-triton", "pack", timed(lambda: torch.ops.sgsc.pack(d_ints, d_widths), args.repeats * 4, sync),
               copy_gbps=gpu_copy_gbps)
        record("ours-triton", "unpack",
               timed(lambda: torch.ops.sgsc.unpack(d_packed, d_widths, 1, group_len), args.repeats * 4, sync),
               copy_gbps=gpu_copy_gbps)
        record("ours-triton", "unpack(out=)",
               timed(lambda: torch.ops.sgsc.unpack_out(d_packed, d_widths, 1, group_len, d_scratch), args.repeats * 4,
                     sync), copy_gbps=gpu_copy_gbps)

    numpy_rate = {r["op"]: r["gcodes_per_s"] for r in results if r["provider"] == "numpy"}
    print(f"{'provider':<12} {'op':<13} {'median ms':>10} {'min-max ms':>17} {'G codes/s':>10} {'GB/s':>7} "
          f"{'% copy':>7} {'x numpy':>8}")
    for r in results:
        base = numpy_rate.get(r["op"].replace("(out=)", ""))
        ratio = f"{r['gcodes_per_s'] / base:8.1f}" if base and r["provider"] != "numpy" else f"{'':>8}"
        print(f"{r['provider']:<12} {r['op']:<13} {1e3 * r['median_s']:10.1f} "
              f"{1e3 * r['min_s']:8.1f}-{1e3 * r['max_s']:<8.1f} {r['gcodes_per_s']:10.3f} {r['gb_per_s']:7.2f} "
              f"{r.get('pct_of_copy', 0):6.0f}% {ratio}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bitpack_{device}_{commit()}_widths{args.widths}.json"
    report = {"device": device, "commit": commit(), "args": vars(args), "results": results}
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
