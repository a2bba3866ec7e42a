"""Guarded load of the optional C++ extension ``sgsc._C``.

A missing or broken build never breaks ``import sgsc``: the reason is kept here, the CPU ops run on
the PyTorch reference, and ``sgsc doctor`` reports what happened.
"""

from __future__ import annotations

import importlib

_extension = None
load_error: str | None = None

try:
    _extension = importlib.import_module("sgsc._C")
except Exception as exc:  # noqa: BLE001 - any failure (missing file, ABI mismatch) means "no extension"
    load_error = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    return _extension is not None


def cpu_isa() -> str:
    """The instruction set the C++ kernels selected on this CPU."""
    if _extension is None:
        return f"none (C++ extension not loaded: {load_error})"
    return _extension.cpu_isa()


def parallel_threads() -> int:
    """Threads the C++ kernels' parallel loops use now (0 without the extension).

    Equals ``torch.get_num_threads()`` in a correct build; 1 means it was compiled without OpenMP.
    """
    return 0 if _extension is None else _extension.parallel_threads()
