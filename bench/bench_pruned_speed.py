"""Forward latency of a ResNet before and after physically pruning ~50% of its conv channels.

Every quantized conv of a ResNet-18-shaped net (4 stages of 2 basic blocks, 1x1 downsampling
shortcuts) gets its odd output channels set to zero bits; residual-coupled producers share the same
indices, so every coupled set is zero-bit and :func:`sgsc.nn.graph_pruning.prune_zero_bit_units`
can remove it. Both models run the same quantized forward (fake-quantized weights) in eval mode on
CPU, interleaved, and the medians (with the 10th-90th percentile spread) and their ratio are printed
and written to ``bench/results/pruned_speed_<device>_<commit>.json``.
Run: ``python bench/bench_pruned_speed.py [--batch 8 --size 64 --repeats 30]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_bitpack import commit, timed
from torch import nn

import sgsc
from sgsc.nn.graph_pruning import prune_zero_bit_units


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, widths=(32, 64, 128, 256), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width)))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = sgsc.quantize_model(ResNet()).eval()
    with torch.no_grad():
        for conv in dense.modules():
            if isinstance(conv, sgsc.QConv2d):
                conv.bits[1::2] = 0.0
    pruned = copy.deepcopy(dense)
    x = torch.randn(args.batch, 3, args.size, args.size)
    report = prune_zero_bit_units(pruned, x)

    times = {"unpruned": [], "pruned": []}
    with torch.inference_mode():
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            for name, model in (("unpruned", dense), ("pruned", pruned)):
                times[name] += timed(lambda: model(x), 1)
    summary = {}
    for name, samples in times.items():
        deciles = statistics.quantiles(samples, n=10)
        summary[name] = {"median_ms": 1e3 * statistics.median(samples), "p10_ms": 1e3 * deciles[0], "p90_ms": 1e3 * deciles[-1]}
    ratio = summary["unpruned"]["median_ms"] / summary["pruned"]["median_ms"]
    result = {"device": f"cpu-{platform.machine()}-{torch.get_num_threads()}t", "commit": commit(), "args": vars(args),
              "parameters": [report.parameters_before, report.parameters_after], "latency": summary,
              "speedup": ratio, "kept_zero_bit": sum(len(k.indices) for k in report.kept)}
    for name, s in summary.items():
        print(f"{name:>9}: median {s['median_ms']:.2f} ms (p10 {s['p10_ms']:.2f}, p90 {s['p90_ms']:.2f})")
    print(f"parameters {report.parameters_before} -> {report.parameters_after}; speed-up {ratio:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pruned_speed_{result['device']}_{result['commit']}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
