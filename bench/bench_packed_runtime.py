"""Packed runtime: ``y = x W^T`` from bit-packed codes against float32 ``F.linear``.

Providers, side by side in one run on the same layer (default 4096 x 4096, 2 threads):

* ``float32``: ``F.linear`` with the dequantized float32 weight (the baseline of every ratio);
* ``ours-cpp``: ``sgsc.ops.packed_linear`` on CPU (the fused unpack-and-multiply kernel, every batch);
* ``reference``: ``sgsc.ops.reference.packed_linear`` (dequantize in plain PyTorch, then ``F.linear``);
* ``ours-triton`` (``--device cuda``): the registered CUDA op, against float32 ``F.linear`` on the GPU
  and ``copy``, a device-to-device copy of the packed words: ours' GB/s (packed bytes read) as a
  share of the copy's (bytes read and written) is the "% of copy" column;
* ``ort-matmulnbits``: onnxruntime's ``com.microsoft::MatMulNBits`` (4 bits, blocks of 32), if onnx and
  onnxruntime are installed; skipped otherwise.

Layers: uniform 4 bits, uniform 2 bits, and a mix of widths drawn uniformly from 1..7 (mean 4) per
output row. Reports medians with the spread (min-max), GB/s of weight bytes read, the speed-up over
float32 measured in the same run, and the resident bytes of the packed weight against the dense
bit-packed size of the same codes (the file's). Writes ``bench/results/packed_runtime_<device>-<threads>t_<commit>.json``.

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
from bench_bitpack import commit

from sgsc import ops
from sgsc.ops import packed as packed_ops
from sgsc.ops import reference


def timed(fn, repeats: int, sync=lambda: None) -> dict:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


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


def ort_matmulnbits(weight: torch.Tensor, threads: int):
    """A session running MatMulNBits (4-bit blocks of 32, symmetric) on ``weight``, or None if unavailable."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n, k = weight.shape
    block = 32
    blocks = weight.reshape(n, k // block, block)
    scale = blocks.abs().amax(dim=2).clamp_min(1e-12) / 7
    q = (torch.round(blocks / scale.unsqueeze(2)).clamp(-8, 7) + 8).to(torch.uint8)  # zero point 8
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                          block_size=block)],
        "packed", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
         helper.make_tensor("scales", TensorProto.FLOAT, [n * (k // block)], scale.numpy().astype(np.float32).ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"A": x})


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
        file_bytes = packed_ops.file_bytes(codes, scales, "output")
        ort = ort_matmulnbits(dense, args.threads) if kind == "uniform4" and not cuda else None
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
            elif batch <= 16 and args.size <= 1024:  # the reference is a Python loop over tiles: slow at 4096
                providers["reference"] = (lambda: reference.packed_linear(x, *weight.tensors(), args.size), weight.nbytes)
            if ort is not None:
                x_np = x.numpy()
                providers["ort-matmulnbits"] = (lambda: ort(x_np), args.size * args.size // 2)
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            float_median, row = None, {}
            for name, (fn, nbytes) in providers.items():
                stats = timed(fn, args.repeats, sync)
                float_median = stats["median_s"] if name == "float32" else float_median
                row[name] = {"layer": kind, "mean_bits": mean_bits, "batch": batch, "provider": name, **stats,
                             "gb_per_s": nbytes / stats["median_s"] / 1e9,
                             "speedup_vs_float32": float_median / stats["median_s"],
                             "resident_bytes": weight.nbytes if name.startswith("ours") else None,
                             "file_bytes": file_bytes}
            if cuda:
                row["ours-triton"]["share_of_copy"] = row["ours-triton"]["gb_per_s"] / row["copy"]["gb_per_s"]
            results += row.values()

    print(f"{args.size}x{args.size}, {args.threads} threads, {device}")
    print(f"{'layer':<9} {'bits':>5} {'batch':>5} {'provider':<16} {'median ms':>10} {'min-max ms':>17} {'GB/s':>7} "
          f"{'x float32':>9} {'resident/file':>13} {'% of copy':>9}")
    for r in results:
        resident = f"{r['resident_bytes'] / r['file_bytes']:13.3f}" if r["resident_bytes"] else f"{'':>13}"
        share = f"{100 * r['share_of_copy']:8.0f}%" if "share_of_copy" in r else ""
        print(f"{r['layer']:<9} {r['mean_bits']:5.2f} {r['batch']:5d} {r['provider']:<16} {1e3 * r['median_s']:10.3f} "
              f"{1e3 * r['min_s']:8.3f}-{1e3 * r['max_s']:<8.3f} {r['gb_per_s']:7.2f} {r['speedup_vs_float32']:9.2f} "
              f"{resident} {share}")
    if not any(r["provider"] == "ort-matmulnbits" for r in results):
        print("ort-matmulnbits: skipped (onnx and onnxruntime are not both installed)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"packed_runtime_{device.replace(' ', '_')}-{args.threads}t_{commit()}.json"
    path.write_text(json.dumps({"device": device, "commit": commit(), "args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
