"""The run's history mirrored to ``metrics.jsonl`` on rank 0 (:class:`_Log`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sgsc._io import atomic_write

METRICS_FILE = "metrics.jsonl"


class _Log:
    """The history (kept in the checkpoint) mirrored to ``metrics.jsonl`` on rank 0.

    Records reach the history from the loop (:meth:`append`) and from the safety checks
    (:meth:`SelfCompression.step`); :meth:`sync` writes whatever the file lacks, in order.
    """

    def __init__(self, history: list, out: Path | None) -> None:
        self.history, self.path, self.written = history, (out / METRICS_FILE if out else None), len(history)
        if self.path is not None:  # on resume, drop whatever the interrupted run logged after its checkpoint
            atomic_write(self.path, lambda h: h.write("".join(_json(r) + "\n" for r in history).encode()))

    def append(self, record: dict) -> None:
        self.history.append(record)
        self.sync()

    def sync(self) -> None:
        if self.path is not None and self.written < len(self.history):
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("".join(_json(r) + "\n" for r in self.history[self.written:]))
        self.written = len(self.history)


def _json(record: dict) -> str:
    """One line of JSON; a NaN or infinite score (a diverged evaluation) is written as null, which JSON can hold."""
    return json.dumps(_finite(record), allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
