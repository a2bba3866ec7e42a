"""Size and onnxruntime latency of the integer ONNX export against the float ONNX file and load_packed.

    python bench/bench_onnx.py runs/cnn/model.sgsc runs/dec/model.sgsc [--threads 1] [--repeats 50]

For each packed file: its size, the integer ONNX file's (sgsc.export.onnx.export_onnx) and the float
ONNX file's (torch.onnx.export of load_packed's model, stripped of the same debugging records), then
median latencies (with the 10th-90th percentile spread) at batch 1 and 256 of onnxruntime on the
integer file (default session, and with ``session.qdq_matmulnbits_accuracy_level=1``, which keeps
onnxruntime from computing fused 4-bit MatMuls with int8-quantized activations), onnxruntime on the
float file, and sgsc's own runtimes (load_packed's float layers, and its packed layers computing from the
codes), side by side in one run. Writes
bench/results/onnx-<host>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sgsc.export import load_packed, read_header
from sgsc.export.onnx import export_onnx, strip_debug_info, zoo_example_input


def _float_onnx(model, example, path: Path) -> None:
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(model, (example.expand(2, *example.shape[1:]).contiguous(),), dynamo=True,
                                dynamic_shapes=({0: batch},), input_names=["input"], verbose=False)
    proto = program.model_proto
    strip_debug_info(proto)  # the same stripping as the integer file: compare weights, not debug records
    path.write_bytes(proto.SerializeToString())


def _timed(call, repeats: int) -> dict:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    p10, p50, p90 = np.percentile(np.array(times) * 1e3, [10, 50, 90])
    return {"median_ms": p50, "p10_ms": p10, "p90_ms": p90}


def _session(path: Path, threads: int, accuracy_level: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(packed: Path, threads: int, repeats: int, workdir: Path) -> dict:
    header = read_header(packed)
    example = zoo_example_input(header["model"], header["config"])
    model = load_packed(packed)
    packed_model = load_packed(packed, runtime="packed")
    int_path, float_path = workdir / f"{packed.parent.name}.int.onnx", workdir / f"{packed.parent.name}.float.onnx"
    export_onnx(packed, int_path, example)
    _float_onnx(model, example, float_path)
    result = {"model": header["model"], "bytes": {"sgsc": packed.stat().st_size, "onnx_int": int_path.stat().st_size,
                                                 "onnx_float": float_path.stat().st_size}, "latency": {}}
    providers = {
        "ort-int": _session(int_path, threads), "ort-int-fp32acc": _session(int_path, threads, "1"),
        "ort-float": _session(float_path, threads),
    }
    for batch in (1, 256):
        x = example.expand(batch, *example.shape[1:]).contiguous()
        if header["model"] == "char_decoder":
            x = torch.randint(0, header["config"]["vocab_size"], tuple(x.shape))
        else:
            x = torch.randn(x.shape)
        feed = {"input": x.numpy()}
        row = {name: _timed(lambda s=s: s.run(None, feed), repeats) for name, s in providers.items()}
        with torch.inference_mode():
            row["sgsc-load_packed"] = _timed(lambda: model(x), repeats)
            row["sgsc-packed-runtime"] = _timed(lambda: packed_model(x), repeats)
        result["latency"][batch] = row
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packed", nargs="+", type=Path, help="packed files (.sgsc) of zoo models")
    parser.add_argument("--threads", type=int, default=1, help="threads for onnxruntime and torch")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"host": platform.node(), "commit": commit, "threads": args.threads, "onnxruntime": ort.__version__,
               "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for packed in args.packed:
            results["models"][str(packed)] = bench(packed, args.threads, args.repeats, Path(workdir))
    for name, model in results["models"].items():
        sizes = model["bytes"]
        print(f"{name} ({model['model']}): .sgsc {sizes['sgsc']} B, .onnx int {sizes['onnx_int']} B "
              f"({sizes['onnx_int'] / sizes['sgsc']:.2f}x), .onnx float {sizes['onnx_float']} B")
        for batch, row in model["latency"].items():
            cells = ", ".join(f"{p} {r['median_ms']:.3f} ms [{r['p10_ms']:.3f}-{r['p90_ms']:.3f}]" for p, r in row.items())
            print(f"  batch {batch}: {cells}")
    out = Path(__file__).parent / "results" / f"onnx-{platform.machine()}-{args.threads}t-{commit}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
