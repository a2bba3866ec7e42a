"""A preservation set as a file: sorted indices written atomically as JSON with the data set size they
index, and read back with every check (:func:`save`, :func:`load`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from sgsc._io import atomic_write

FORMAT = "sgsc.preservation"
VERSION = 1


def _check_indices(indices: torch.Tensor | Sequence[int], dataset_size: int, source: str) -> torch.Tensor:
    values = torch.as_tensor(indices)
    if values.numel() == 0:
        raise ValueError(f"{source}: the preservation set is empty")
    if values.dim() != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(
            f"{source}: indices must be a 1-D integer sequence, got {values.dtype} of shape {tuple(values.shape)}"
        )
    values = values.to(torch.int64)
    if int(values.min()) < 0 or int(values.max()) >= dataset_size:
        low, high = int(values.min()), int(values.max())
        raise ValueError(f"{source}: indices must lie in [0, {dataset_size}), got [{low}, {high}]")
    if values.unique().numel() != values.numel():
        raise ValueError(f"{source}: indices contain duplicates")
    return values


def save(
    indices: torch.Tensor | Sequence[int], path: str | os.PathLike, *, dataset_size: int, meta: dict | None = None
) -> None:
    """Write the set atomically as JSON, recording ``dataset_size`` (and optional JSON-able ``meta``)."""
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
    values = _check_indices(indices, dataset_size, "save")
    path = Path(path)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "dataset_size": dataset_size,
        "size": values.numel(),
        "indices": values.tolist(),
        "meta": meta or {},
    }
    text = json.dumps(record)
    atomic_write(path, text.encode("utf-8"))


def load(path: str | os.PathLike, *, dataset_size: int | None = None) -> torch.Tensor:
    """Read a set written by :func:`save`; ``ValueError`` if it was built for another data set size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preservation set not found: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a preservation-set JSON file ({exc})") from exc
    found = record.get("format") if isinstance(record, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path}: not an sgsc preservation set (format {found!r}, expected {FORMAT!r})")
    if record.get("version") != VERSION:
        version = record.get("version")
        raise ValueError(f"{path}: preservation-set version {version!r} is not supported (expected {VERSION})")
    recorded = record.get("dataset_size")
    if dataset_size is not None and recorded != dataset_size:
        raise ValueError(f"{path}: built for a data set of {recorded} examples, but this one has {dataset_size}")
    if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 1:
        raise ValueError(f"{path}: invalid dataset_size {recorded!r}")
    indices = record.get("indices")
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{path}: indices must be a list of ints")
    values = _check_indices(indices, recorded, str(path))
    if values.numel() != record.get("size"):
        raise ValueError(f"{path}: holds {values.numel()} indices but records size {record.get('size')!r}")
    return values
