"""sgsc: Safety-Guided Self Compression for PyTorch."""

from sgsc import data, models, ops, preservation
from sgsc.layers import (
    QCausalSelfAttention,
    QConv2d,
    QLinear,
    average_bits,
    model_bits_report,
    quantize_model,
    quantized_layers,
)
from sgsc.ops import fake_quantize

__version__ = "0.1.0"

__all__ = [
    "QCausalSelfAttention",
    "QConv2d",
    "QLinear",
    "__version__",
    "average_bits",
    "data",
    "fake_quantize",
    "model_bits_report",
    "models",
    "ops",
    "preservation",
    "quantize_model",
    "quantized_layers",
]
