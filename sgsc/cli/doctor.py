"""`sgsc doctor`: what this installation can run, and why not where it cannot."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform

import torch

from sgsc.ops import native as _native


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_status() -> str:
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return f"unavailable ({exc}); CUDA ops will raise until it is installed"
    return f"{triton.__version__}"


def _kernels_isa() -> str:
    if not _native.available():
        return _native.cpu_isa()
    asked = _native.requested_isa()
    source = f"SGSC_CPU_ISA={asked}" if asked else "this CPU's best; SGSC_CPU_ISA lowers it"
    return f"{_native.cpu_isa()} ({source}; CPU supports {_native.cpu_isa_detected()})"


def _torch_capability() -> str:
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"{torch.backends.cpu.get_cpu_capability()}" + (f" (ATEN_CPU_CAPABILITY={forced})" if forced else "")


def report() -> dict[str, str]:
    import sgsc

    cuda = torch.cuda.is_available()
    return {
        "sgsc": sgsc.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CPU threads": str(torch.get_num_threads()),
        "C++ extension": "loaded" if _native.available() else f"NOT loaded: {_native.load_error}",
        "CPU kernels ISA": _kernels_isa(),
        "torch CPU capability": _torch_capability(),
        "CPU kernels threads": str(_native.parallel_threads()),
        "triton": _triton_status(),
        "CUDA": torch.cuda.get_device_name() if cuda else "not available (GPU ops need a CUDA device)",
        "numpy": _version("numpy"),
        "scikit-learn": _version("scikit-learn"),
        "safetensors": _version("safetensors"),
    }


def register(subparsers) -> None:
    parser = subparsers.add_parser("doctor", help="print versions and which kernels this machine runs")
    parser.set_defaults(func=lambda args: print_report())


def print_report() -> int:
    rows = report()
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0
