"""PNG plots of a compression run: accuracy and size over training, weights, bits per channel.

Figures are drawn with matplotlib's object API on an Agg canvas, so nothing here touches pyplot's
global backend or needs a display.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sgsc._deps import require
from sgsc.nn import quantized_layers

FigureCanvasAgg = require("matplotlib.backends.backend_agg", "train").FigureCanvasAgg
Figure = require("matplotlib.figure", "train").Figure


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_training(history: list[dict], path: str | os.PathLike) -> Path:
    """Test accuracy and model bytes against step (the paper's Fig. 1), from ``eval`` records."""
    evals = [r for r in history if r.get("kind") == "eval"]
    if not evals:
        raise ValueError("history has no eval records to plot")
    steps = [r["step"] for r in evals]
    figure = Figure(figsize=(7, 4))
    accuracy_axis = figure.add_subplot()
    accuracy_axis.plot(steps, [r["test_accuracy"] for r in evals], color="tab:blue", marker="o", ms=3)
    accuracy_axis.set_xlabel("step")
    accuracy_axis.set_ylabel("test accuracy", color="tab:blue")
    size_axis = accuracy_axis.twinx()
    size_axis.plot(steps, [r["bytes"] for r in evals], color="tab:red", marker="s", ms=3)
    size_axis.set_ylabel("model bytes", color="tab:red")
    size_axis.set_ylim(bottom=0)
    for check in (r for r in history if r.get("kind") == "check" and r.get("restored")):
        accuracy_axis.axvline(check["step"], color="tab:gray", lw=0.6, ls=":")
    accuracy_axis.set_title("accuracy and size during training (dotted: restores)")
    return _save(figure, path)


def plot_accuracy_vs_bytes(history: list[dict], path: str | os.PathLike, *, file_bytes: int | None = None,
                           file_accuracy: float | None = None, float_bytes: int | None = None) -> Path:
    """Test accuracy against model bytes through training, from ``eval`` records: the trade-off the run
    walked, from the first evaluation to the last, with the packed file written (``file_bytes``,
    ``file_accuracy``) and the float32 model's size (``float_bytes``) when given."""
    evals = [r for r in history if r.get("kind") == "eval"]
    if not evals:
        raise ValueError("history has no eval records to plot")
    figure = Figure(figsize=(7, 4))
    axis = figure.add_subplot()
    sizes, accuracies = [r["bytes"] for r in evals], [r["test_accuracy"] for r in evals]
    axis.plot(sizes, accuracies, color="tab:gray", lw=0.8, zorder=1)
    points = axis.scatter(sizes, accuracies, c=[r["step"] for r in evals], cmap="viridis", s=18, zorder=2)
    figure.colorbar(points, ax=axis, label="step")
    if file_bytes is not None and file_accuracy is not None:
        axis.scatter([file_bytes], [file_accuracy], marker="*", s=160, color="tab:red", zorder=3,
                     label=f"packed file: {file_bytes} bytes, {file_accuracy:.4f}")
    if float_bytes is not None:
        axis.axvline(float_bytes, color="tab:blue", lw=0.8, ls="--", label=f"float32: {float_bytes} bytes")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="lower right")
    axis.set_xscale("log")
    axis.set_xlabel("model bytes (log scale)")
    axis.set_ylabel("test accuracy")
    axis.set_title("accuracy against size during compression")
    return _save(figure, path)


@torch.no_grad()
def plot_weight_histogram(model: nn.Module, path: str | os.PathLike) -> Path:
    """Histogram of every quantized layer's weights as the forward pass sees them (Fig. 3)."""
    values = [layer.quantized_weight().detach().float().flatten().cpu() for _, layer in quantized_layers(model)]
    values = torch.cat(values) if values else torch.zeros(0)
    figure = Figure(figsize=(7, 4))
    axis = figure.add_subplot()
    nonzero = values[values != 0]
    axis.hist(nonzero.numpy(), bins=101, color="tab:purple")
    axis.set_yscale("log")
    axis.set_xlabel("quantized weight value")
    axis.set_ylabel("count")
    axis.set_title(f"quantized weights ({int((values == 0).sum())} of {values.numel()} are zero, not shown)")
    return _save(figure, path)


def plot_bits_per_channel(model: nn.Module, path: str | os.PathLike) -> Path:
    """One bar panel per quantized layer: the learned bits of each group (output channel or head)."""
    layers = [(name, layer) for name, layer in quantized_layers(model) if layer.bits.numel()]
    figure = Figure(figsize=(8, 1.6 * max(len(layers), 1) + 0.6))
    for row, (name, layer) in enumerate(layers, start=1):
        axis = figure.add_subplot(len(layers), 1, row)
        bits = layer.bits.detach().float().clamp(min=0).cpu()
        axis.bar(range(bits.numel()), bits.numpy(), width=1.0, color="tab:green")
        axis.set_ylabel("bits")
        axis.set_title(f"{name}: {bits.numel()} groups, mean {float(bits.mean()):.2f}", fontsize=9)
    if layers:
        figure.axes[-1].set_xlabel("group (output channel / head)")
    return _save(figure, path)


def save_all(model: nn.Module, history: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """``training.png``, ``weights.png`` and ``bits.png`` in ``out_dir``."""
    out = Path(out_dir)
    paths = [plot_weight_histogram(model, out / "weights.png"), plot_bits_per_channel(model, out / "bits.png")]
    if any(r.get("kind") == "eval" for r in history):
        paths.insert(0, plot_training(history, out / "training.png"))
    return paths
