"""What safety costs per training step: SGSC (preservation term, guard checks) against unsafe self-compression.

Both runs start from the same weights and train the same steps through :func:`sgsc.compress` on
Fashion-MNIST (digits when its files are not found): unsafe with no preservation set and no guard,
SGSC with ``preserve=0.05`` and the default contract. The time is CPU time of this process
(``time.process_time``) on one torch thread, which a busy machine inflates far less than wall time.
An SGSC run's one-time costs (choosing the preservation set, the reference's outcomes and outputs,
the final check) are reported apart; the per-step ratio is the rest, guard checks included, over the
unsafe run's time. Runs alternate (unsafe, SGSC, unsafe, ...) and medians are reported; the result is
written to ``bench/results/step_cost_<model>_<commit>.json``.

Run: ``python bench/bench_step_cost.py [--model cnn|resnet20] [--steps 400] [--repeats 2]
[--preservation-batches 32,16]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_bitpack import commit

import sgsc
import sgsc.train.loop as loop
from sgsc.experiments.resnet_model import resnet20
from sgsc.nn.zoo import build_model
from sgsc.train import CompressConfig, SelfCompression, TrainConfig, load_data


class OneTimeClock:
    """CPU seconds spent in the one-time parts of an SGSC run (patched in for the run's duration)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start, self._finish = loop._start_compression, SelfCompression.finish

    def __enter__(self) -> OneTimeClock:
        loop._start_compression = self._timed(self._start)
        SelfCompression.finish = self._timed(self._finish)
        return self

    def __exit__(self, *exc) -> None:
        loop._start_compression, SelfCompression.finish = self._start, self._finish

    def _timed(self, fn):
        def timed(*args, **kwargs):
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - started
        return timed


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("paper_cnn", {}) if name == "cnn" else sgsc.quantize_model(resnet20())


def _run(name: str, train, preservation_batch: int | None, args) -> dict:
    """One run; ``preservation_batch`` None is unsafe self-compression."""
    safe = preservation_batch is not None
    model = _model(name)
    settings = dict(steps=args.steps, warmup_steps=args.warmup, k=args.k, gamma=args.gamma, progress=False)
    if safe:
        settings["preservation_batch"] = preservation_batch
    with OneTimeClock() as once:
        started = time.process_time()
        result = sgsc.compress(model, train, preserve=0.05 if safe else None, **settings)
        total = time.process_time() - started
    checks = [e for e in result.history if e.get("kind") == "check"]
    return {"cpu_seconds": total, "one_time_seconds": once.seconds if safe else 0.0,
            "guard_examples": [e["guard"]["n"] for e in checks if "guard" in e], "average_bits": result.average_bits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("cnn", "resnet20"), default="cnn")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--gamma", type=float, default=0.03)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default="auto")
    parser.add_argument("--preservation-batches", default=str(CompressConfig().preservation_batch),
                        help="comma-separated preservation batches of the SGSC runs (default: the library's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(TrainConfig(data=args.data))
    sizes = [int(b) for b in args.preservation_batches.split(",")]
    runs = {"unsafe": [], **{f"sgsc_pb{b}": [] for b in sizes}}
    for _ in range(args.repeats):
        for kind, size in zip(runs, (None, *sizes)):
            runs[kind].append(_run(args.model, data.train, size, args))
            print(kind, json.dumps(runs[kind][-1]), flush=True)
    unsafe = statistics.median(r["cpu_seconds"] for r in runs["unsafe"])
    summary = {"model": args.model, "data": data.source, "steps": args.steps, "k": args.k, "torch_threads": 1,
               "unsafe_cpu_seconds": unsafe, "sgsc": {}, "cpu": platform.processor() or platform.machine(),
               "commit": commit(), "runs": runs}
    for kind, size in zip(list(runs)[1:], sizes):
        per_step = statistics.median(r["cpu_seconds"] - r["one_time_seconds"] for r in runs[kind])
        once = statistics.median(r["one_time_seconds"] for r in runs[kind])
        summary["sgsc"][kind] = {"preservation_batch": size, "steps_cpu_seconds": per_step,
                                 "one_time_cpu_seconds": once, "step_ratio": per_step / unsafe}
        print(f"{args.model}, preservation batch {size}: an SGSC step costs {per_step / unsafe:.2f}x an unsafe step "
              f"(guard checks included), plus {once:.1f} CPU s once (preservation set, reference, final check); "
              f"unsafe {unsafe:.1f} CPU s")
    out = Path(__file__).parent / "results" / f"step_cost_{args.model}_{commit()}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
