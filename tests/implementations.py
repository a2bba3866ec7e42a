"""The implementations of fake_quantize under test, each run the same way.

"cpu" is the registered op on CPU (C++ kernels, or the reference if the build was skipped),
"cuda" the registered op on a GPU (Triton), and "triton-interpret" the Triton launchers called
directly on CPU tensors in the interpreter, so the GPU code is exercised without a GPU.
"""

from __future__ import annotations

import importlib.util

import torch


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names.append("cuda")
    elif triton_importable():
        names.append("triton-interpret")
    return names


def device_of(impl: str) -> str:
    return "cuda" if impl == "cuda" else "cpu"


def forward(impl: str, w, b, e, rounding):
    if impl == "triton-interpret":
        from sgsc.kernels import fake_quantize as kernels

        q = torch.empty_like(w, memory_format=torch.contiguous_format)
        kernels.forward(w, b, e, rounding, q)
        return q
    return torch.ops.sgsc.fake_quantize(w, b, e, rounding)


def backward(impl: str, grad_q, w, b, e, rounding):
    if impl == "triton-interpret":
        from sgsc.kernels import fake_quantize as kernels

        return kernels.backward(grad_q, w, b, e, rounding)
    return torch.ops.sgsc.fake_quantize_backward(grad_q, w, b, e, rounding)


def exp2_matches_torch(impl: str) -> bool:
    """The interpreter computes 2^x with NumPy, which can differ from torch in the last bit for
    fractional x; there, exactness is checked with whole exponents and bit depths."""
    return impl != "triton-interpret"
