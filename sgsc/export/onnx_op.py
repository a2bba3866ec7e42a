"""The op the ONNX export traces, its translation, and the integer types that hold a layer's codes.

``torch.ops.sgsc_onnx.dequantize_linear`` is a marker: the twin of :mod:`sgsc.export.onnx_twin` computes
each weight with it, and :func:`_translate_dequantize` makes it one ONNX ``DequantizeLinear``.
:func:`onnx_integer_type` is the smallest ONNX integer type a width fits at an opset. Imported only
by the ONNX export (the ``[onnx]`` extra).
"""

from __future__ import annotations

import torch

from sgsc.ops.spec import MAX_WIDTH

# opset 21 brings INT4 (and per-axis/blocked DequantizeLinear of it), opset 25 INT2.
INT4_OPSET = 21
INT2_OPSET = 25


@torch.library.custom_op("sgsc_onnx::dequantize_linear", mutates_args=())
def dequantize_linear(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear`` with zero point 0: ``codes * scale`` with ``scale`` along ``axis``, in float32.

    Only the ONNX export traces it (its translation is one ``DequantizeLinear`` node); it lives here,
    not in :mod:`sgsc.ops.library`, because it is a marker for the exporter, not a kernel. Its
    arithmetic is the reader's: the code as float32 times the power-of-two scale, exact.
    """
    shape = [1] * codes.dim()
    shape[axis] = -1
    return codes.to(torch.float32) * scale.reshape(shape)


@dequantize_linear.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    torch._check(scale.dim() == 1, lambda: f"scale must be 1-D, got shape {tuple(scale.shape)}")
    torch._check(scale.numel() == codes.shape[axis],
                 lambda: f"scale has {scale.numel()} entries for axis {axis} of size {codes.shape[axis]}")
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def onnx_integer_type(width: int, opset: int) -> str:
    """The smallest signed ONNX integer type holding ``width``-bit two's-complement codes at ``opset``."""
    if width > MAX_WIDTH:
        raise ValueError(f"width must be at most {MAX_WIDTH}, got {width}")
    for name, bits, since in (("INT2", 2, INT2_OPSET), ("INT4", 4, INT4_OPSET), ("INT8", 8, 0), ("INT16", 16, 0)):
        if width <= bits and opset >= since:
            return name
    return "INT32"


def _translate_dequantize(codes, scale, axis: int):
    from onnxscript import opset21 as op

    return op.DequantizeLinear(codes, scale, axis=axis)
