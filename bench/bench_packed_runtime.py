"""Packed runtime: ``y = x W^T`` from bit-packed codes against float32 ``F.linear``.

Providers, side by side in one run on the same layer (default 4096 x 4096, 2 threads), timed interleaved
(each round calls every provider once, the order rotating from round to round), medians over the rounds:

* ``float32``: ``F.linear`` with the dequantized float32 weight (the baseline of every ratio);
* ``bf16``: ``F.linear`` on bfloat16 copies of x and the weight (torch's CPU bf16 GEMM);
* ``ours-cpp``: ``sgsc.ops.packed_linear`` on CPU, float activations (the fused unpack-and-multiply kernel);
* ``ours-cpp-int8``: the same with ``activations="int8"`` (x quantized per block of 128 columns, integer
  dot products: AVX-512 VNNI / AVX2);
* ``reference``: ``sgsc.ops.reference.packed_linear`` (dequantize in plain PyTorch, then ``F.linear``; small layers);
* ``ours-triton`` (``--device cuda``): the registered CUDA op, against float32 ``F.linear`` on the GPU
  and ``copy``, a device-to-device copy of the packed words: ours' GB/s (packed bytes read) as a
  share of the copy's (bytes read and written) is the "% of copy" column;
* ``ort-nbits-acc0`` / ``ort-nbits-acc4``: onnxruntime's ``com.microsoft::MatMulNBits`` at
  ``accuracy_level`` 0 (float activations) and 4 (int8 activations), on the uniform 4- and 2-bit layers
  with exactly our weights (zero point ``2^(bits-1)``, each block's scale its row's), if onnx and
  onnxruntime are installed.

Layers: uniform 4 bits, uniform 2 bits, and a mix of widths drawn uniformly from 1..7 (mean 4) per
output row. Reports medians with the spread (min-max), GB/s of weight bytes read, the speed-up over
float32 measured in the same run, the relative error ``||y - y_exact|| / ||y_exact||`` against the float64
product of the same weights, and the resident bytes of the packed weight against the dense bit-packed
size of the same codes (the file's). The CPU's model and SIMD flags go into the result file
(``bench_bitpack.cpu_info``). Writes ``bench/results/packed_runtime_<device>-<threads>t_<commit>.json``.

    python bench/bench_packed_runtime.py
    python bench/bench_packed_runtime.py --size 1024 --batches 1,16,64 --threads 1
    python bench/bench_packed_runtime.py --device cuda --size 16384   # larger than the GPU's L2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_bitpack import commit, cpu_info

from sgsc import ops
from sgsc.ops import packed as packed_ops
from sgsc.ops import reference


def side_by_side(fns: dict, repeats: int, sync=lambda: None) -> dict:
    """Each provider's per-call times: one warm-up call each, then ``repeats`` rounds calling every provider
    once, the order rotated by one each round (so no provider always runs after the same other)."""
    for fn in fns.values():
        fn()
        sync()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for name, t in times.items()}


def make_layer(kind: str, size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind.startswith("uniform"):
        widths = torch.full((size,), int(kind.removeprefix("uniform")), dtype=torch.int64)
    else:
        widths = torch.randint(1, 8, (size,), generator=gen)
    half = (1 << (widths - 1)).unsqueeze(1)
    codes = (torch.rand(size, size, generator=gen) * 2 * half).floor().long() - half
    scales = torch.exp2(torch.randint(-10, -4, (size,), generator=gen).float())
    return codes, scales, float(widths.float().mean())


def ort_matmulnbits(codes: torch.Tensor, scales: torch.Tensor, bits: int, accuracy_level: int, threads: int):
    """A session running MatMulNBits (``bits`` bits, blocks of 32) on exactly ``codes * scales`` (row scales),
    or None if onnx/onnxruntime are missing."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n, k = codes.shape
    block, per_byte = 32, 8 // bits
    q = (codes + (1 << (bits - 1))).to(torch.uint8).reshape(n, k // block, block // per_byte, per_byte)
    packed = sum(q[..., j] << (bits * j) for j in range(per_byte)).to(torch.uint8).numpy()
    block_scales = scales.repeat_interleave(k // block).numpy().astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                          block_size=block, accuracy_level=accuracy_level)],
        "packed", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
         helper.make_tensor("scales", TensorProto.FLOAT, [n * (k // block)], block_scales)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Its pool threads would otherwise spin after each run, taking the cores from the provider timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"A": x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the layer is size x size")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--layers", default="uniform4,uniform2,mixed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()

    results = []
    for kind in args.layers.split(","):
        codes, scales, mean_bits = make_layer(kind, args.size, args.seed)
        weight = ops.pack_weight(codes, scales, "output")
        dense = (codes.float() * scales.unsqueeze(1)).contiguous()
        dense_bf16, dense64 = dense.bfloat16(), dense.double()
        file_bytes = packed_ops.file_bytes(codes, scales, "output")
        orts = {}
        if kind in ("uniform4", "uniform2") and not cuda:
            for level in (0, 4):
                session = ort_matmulnbits(codes, scales, int(kind[-1]), level, args.threads)
                if session is not None:
                    orts[f"ort-nbits-acc{level}"] = session
        if cuda:
            weight, dense = packed_ops.to_device(weight, "cuda"), dense.cuda()
            copy_target = torch.empty_like(weight.words)
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, args.size, generator=torch.Generator().manual_seed(batch)).to(args.device)
            providers = {
                "float32": (lambda: F.linear(x, dense), dense.numel() * 4),
                "ours-triton" if cuda else "ours-cpp": (lambda: ops.packed_linear(x, weight), weight.nbytes),
            }
            if cuda:
                providers["copy"] = (lambda: copy_target.copy_(weight.words), 2 * weight.words.numel() * 4)
            else:
                providers["bf16"] = (lambda: F.linear(x.bfloat16(), dense_bf16), dense.numel() * 2)
                providers["ours-cpp-int8"] = (lambda: ops.packed_linear(x, weight, activations="int8"), weight.nbytes)
                if batch <= 16 and args.size <= 1024:  # the reference is a Python loop over tiles: slow at 4096
                    providers["reference"] = (lambda: reference.packed_linear(x, *weight.tensors(), args.size),
                                              weight.nbytes)
            x_np = x.cpu().numpy()
            for name, session in orts.items():
                providers[name] = (lambda s=session: s(x_np), args.size * args.size * int(kind[-1]) // 8)
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            timings = side_by_side({name: fn for name, (fn, _) in providers.items()}, args.repeats, sync)
            exact = x.cpu().double() @ dense64.T
            float_median = timings["float32"]["median_s"]
            row = {}
            for name, (fn, nbytes) in providers.items():
                stats = timings[name]
                y = torch.as_tensor(fn()).cpu().double()
                row[name] = {"layer": kind, "mean_bits": mean_bits, "batch": batch, "provider": name, **stats,
                             "gb_per_s": nbytes / stats["median_s"] / 1e9,
                             "speedup_vs_float32": float_median / stats["median_s"],
                             "rel_error": float((y - exact).norm() / exact.norm()) if name != "copy" else None,
                             "resident_bytes": weight.nbytes if name.startswith("ours") else None,
                             "file_bytes": file_bytes}
            if cuda:
                row["ours-triton"]["share_of_copy"] = row["ours-triton"]["gb_per_s"] / row["copy"]["gb_per_s"]
            results += row.values()

    cpu = cpu_info()
    print(f"{args.size}x{args.size}, {args.threads} threads, {device} ({cpu['model_name']}; sgsc ISA "
          f"{cpu['sgsc_cpu_isa']}; flags {' '.join(cpu['flags'])}; load average {cpu['load_average']})")
    print(f"{'layer':<9} {'bits':>5} {'batch':>5} {'provider':<16} {'median ms':>10} {'min-max ms':>17} {'GB/s':>7} "
          f"{'x float32':>9} {'rel err':>8} {'resident/file':>13} {'% of copy':>9}")
    for r in results:
        resident = f"{r['resident_bytes'] / r['file_bytes']:13.3f}" if r["resident_bytes"] else f"{'':>13}"
        share = f"{100 * r['share_of_copy']:8.0f}%" if "share_of_copy" in r else ""
        error = "" if r["rel_error"] is None else f"{r['rel_error']:8.1e}"
        print(f"{r['layer']:<9} {r['mean_bits']:5.2f} {r['batch']:5d} {r['provider']:<16} {1e3 * r['median_s']:10.3f} "
              f"{1e3 * r['min_s']:8.3f}-{1e3 * r['max_s']:<8.3f} {r['gb_per_s']:7.2f} {r['speedup_vs_float32']:9.2f} "
              f"{error:>8} {resident} {share}")
    if not any(r["provider"].startswith("ort-") for r in results):
        print("ort-matmulnbits: skipped (onnx and onnxruntime are not both installed)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"packed_runtime_{device.replace(' ', '_')}-{args.threads}t_{commit()}.json"
    path.write_text(json.dumps({"device": device, "cpu": cpu, "commit": commit(), "args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
