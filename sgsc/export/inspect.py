"""``sgsc inspect``: account for every byte of a packed file, per layer and in total."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sgsc.export import codec
from sgsc.export.format import STATE_PREFIX, printable
from sgsc.export.reader import PackedFile, check_layer_values, packed_layers, read_packed


@dataclass
class LayerSummary:
    name: str
    shape: list[int]
    groups: int
    width_histogram: dict[int, int]
    sparse_groups: int  # stored as a nonzero mask and the nonzero codes
    packed_bytes: int
    float32_bytes: int


@dataclass
class PackedSummary:
    path: str
    file_bytes: int
    packed_bytes: int  # the codes stream: each group dense, or mask plus nonzero codes
    group_metadata_bytes: int  # one width byte and one float32 scale per group
    plain_bytes: int  # tensors stored as they are
    float32_bytes: int  # the same model with every quantized weight in float32
    layers: list[LayerSummary]

    @property
    def overhead_bytes(self) -> int:
        return self.file_bytes - self.packed_bytes - self.group_metadata_bytes - self.plain_bytes

    @property
    def average_bits(self) -> float:
        weights = sum(layer.float32_bytes for layer in self.layers) / 4
        return 8 * self.packed_bytes / weights if weights else 0.0


def summarize(path: str | os.PathLike, *, max_bytes: int | None = None) -> PackedSummary:
    """Read a packed file, check it as :func:`~sgsc.export.load_packed` does, and account for every byte of it.

    ``max_bytes`` bounds the memory the model would need, as for ``load_packed``: a file this
    refuses, ``load_packed`` refuses with the same error, and the other way round. As there, the header
    is checked before the rest of the file is read.
    """
    path = Path(path)
    return _summary(path, read_packed(path, max_bytes))


def summarize_bytes(path: Path, data: bytes, *, max_bytes: int | None = None) -> PackedSummary:
    """:func:`summarize` of a file's bytes ``data`` (``path`` names it in errors and in the summary)."""
    return _summary(path, read_packed(path, max_bytes, data))


def _summary(path: Path, packed_file: PackedFile) -> PackedSummary:
    check_layer_values(path, packed_file)  # the checks that need the codes, as loading runs them
    layers = []
    for slot, packed, width_bytes, _ in packed_layers(packed_file):
        widths, sparse = codec.split_width_bytes(width_bytes)
        histogram: dict[int, int] = {}
        for width in widths.tolist():
            histogram[width] = histogram.get(width, 0) + 1
        layers.append(LayerSummary(slot.name, list(slot.shape), slot.groups, dict(sorted(histogram.items())),
                                   int(sparse.sum()), packed.numel(), 4 * slot.numel))
    plain = sum(t.numel() * t.element_size() for key, t in packed_file.tensors.items() if key.startswith(STATE_PREFIX))
    groups = sum(layer.groups for layer in layers)
    return PackedSummary(
        path=str(path),
        file_bytes=packed_file.file_bytes,
        packed_bytes=sum(layer.packed_bytes for layer in layers),
        group_metadata_bytes=5 * groups,
        plain_bytes=plain,
        float32_bytes=sum(layer.float32_bytes for layer in layers) + plain,
        layers=layers,
    )


def format_summary(summary: PackedSummary) -> str:
    """The table `sgsc inspect` prints: one row per quantized layer, then the totals."""
    rows = [f"{'layer':<28} {'shape':<18} {'groups':>6}  {'bits histogram (width:groups)':<34} {'sparse':>6} "
            f"{'bytes':>10} {'share':>6}"]
    total = summary.file_bytes
    for layer in summary.layers:
        histogram = " ".join(f"{w}:{n}" for w, n in layer.width_histogram.items())
        rows.append(
            f"{printable(layer.name):<28} {'x'.join(map(str, layer.shape)):<18} {layer.groups:>6}  {histogram:<34} "
            f"{layer.sparse_groups:>6} {layer.packed_bytes:>10} {100 * layer.packed_bytes / total:>5.1f}%"
        )
    rows += [
        "",
        f"packed weights (per group ceil(width x L / 8), or for sparse groups a mask of ceil(L / 8) and the "
        f"nonzero codes): {summary.packed_bytes} bytes, "
        f"{summary.average_bits:.3f} bits per weight",
        f"per-group widths and scales: {summary.group_metadata_bytes} bytes",
        f"other tensors stored as they are (biases, norms, embeddings): {summary.plain_bytes} bytes",
        f"file header and framing: {summary.overhead_bytes} bytes",
        f"on disk: {summary.file_bytes} bytes = {100 * summary.file_bytes / summary.float32_bytes:.2f}% of the "
        f"tensors of this architecture in float32 ({summary.float32_bytes} bytes; after physical pruning that is "
        "the pruned architecture, smaller than the original float model)",
    ]
    return "\n".join(rows)
