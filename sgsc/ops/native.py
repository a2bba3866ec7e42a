"""Guarded load of the optional C++ extension ``sgsc._C``.

A missing or broken build never breaks ``import sgsc``: the reason is kept here, the CPU ops run on
the PyTorch reference, and ``sgsc doctor`` reports what happened.
"""

from __future__ import annotations

import importlib
import os
import warnings

# The levels the C++ kernels are compiled for (csrc/isa.h), best first.
ISA_LEVELS = ("avx512", "avx2", "sse41", "scalar")


def requested_isa() -> str | None:
    """The level ``SGSC_CPU_ISA`` asks the C++ kernels to run at (None: the CPU's best), checked."""
    asked = os.environ.get("SGSC_CPU_ISA", "").strip().lower()
    if not asked:
        return None
    if asked not in ISA_LEVELS:
        raise ValueError(f"SGSC_CPU_ISA must be one of {', '.join(ISA_LEVELS)} (or unset), got {asked!r}")
    return asked


_requested = requested_isa()  # before the library reads it: a typo must not silently run the best level
_extension = None
load_error: str | None = None

try:
    _extension = importlib.import_module("sgsc._C")
except Exception as exc:  # noqa: BLE001 - any failure (missing file, ABI mismatch) means "no extension"
    load_error = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    return _extension is not None


if _extension is not None and _requested is not None and _extension.cpu_isa() != _requested:
    warnings.warn(f"SGSC_CPU_ISA={_requested} asks for more than this CPU supports; the C++ kernels run "
                  f"{_extension.cpu_isa()}", stacklevel=2)


def cpu_isa() -> str:
    """The instruction set the C++ kernels run with: the CPU's best (:func:`cpu_isa_detected`), or the
    lower level ``SGSC_CPU_ISA`` asks for."""
    if _extension is None:
        return f"none (C++ extension not loaded: {load_error})"
    return _extension.cpu_isa()


def cpu_isa_detected() -> str:
    """The best instruction set of this CPU among :data:`ISA_LEVELS` (what the kernels run unless told lower)."""
    if _extension is None:
        return f"none (C++ extension not loaded: {load_error})"
    return _extension.cpu_isa_detected()


def parallel_threads() -> int:
    """Threads the C++ kernels' parallel loops use now (0 without the extension).

    Equals ``torch.get_num_threads()`` in a correct build; 1 means it was compiled without OpenMP.
    """
    return 0 if _extension is None else _extension.parallel_threads()
