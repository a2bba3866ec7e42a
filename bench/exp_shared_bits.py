"""Do residual-coupled channels prune better with one shared bit depth, a penalty, or neither?

Trains a small ResNet (widths 8/16/32, 16x16 images of a fixed random teacher's classes) for a few
hundred steps with ``cross-entropy + gamma * average_bits``, three ways: independent bits, one bits
Parameter per coupled set (:func:`share_coupled_bits`), and independent bits plus
:func:`coupled_bits_penalty`; then counts zero-bit conv channels and the channels
:func:`prune_zero_bit_units` removes. Run: ``python bench/exp_shared_bits.py [--steps 300]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_pruned_speed import ResNet  # noqa: E402
from coupled_bits import coupled_bits_penalty, coupled_producers, share_coupled_bits  # noqa: E402

import sgsc  # noqa: E402
from sgsc.nn.graph_pruning import prune_zero_bit_units  # noqa: E402


def run(variant: str, steps: int, gamma: float, beta: float) -> dict:
    torch.manual_seed(0)
    model = sgsc.quantize_model(ResNet((8, 16, 32)))
    example = torch.randn(2, 3, 16, 16)
    coupled = coupled_producers(model, example)
    if variant == "shared":
        share_coupled_bits(model, coupled)
    quant = [p for n, p in model.named_parameters() if n.endswith(("bits", "exponent"))]
    ids = {id(p) for p in quant}
    optimizer = torch.optim.Adam([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": 2e-3},
                                  {"params": quant, "lr": 0.05}])
    teacher = torch.nn.Linear(3 * 4 * 4, 10)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 3, 16, 16, generator=generator)
        with torch.no_grad():
            y = teacher(F.adaptive_avg_pool2d(x, 4).flatten(1)).argmax(1)
        loss = F.cross_entropy(model(x), y) + gamma * sgsc.average_bits(model)
        if variant == "penalty":
            loss = loss + beta * coupled_bits_penalty(model, coupled)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    convs = [m for m in model.modules() if isinstance(m, sgsc.QConv2d)]
    zero_bit = sum(int((m.bits.detach() <= 0).sum()) for m in convs)
    channels_before = sum(m.out_channels for m in convs)
    report = prune_zero_bit_units(model, example)
    return {"variant": variant, "zero_bit_conv_channels": zero_bit, "conv_channels_before": channels_before,
            "conv_channels_removed": channels_before - sum(m.out_channels for m in convs),
            "zero_bit_kept": sum(len(k.indices) for k in report.kept), "loss": round(loss.item(), 3),
            "parameters": [report.parameters_before, report.parameters_after], "coupled_sets": len(coupled)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--beta", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for variant in ("independent", "shared", "penalty"):
        print(json.dumps(run(variant, args.steps, args.gamma, args.beta)), flush=True)


if __name__ == "__main__":
    main()
