"""sgsc: Safety-Guided Self Compression for PyTorch."""

from sgsc import data, export, models, ops, preservation, trainer
from sgsc.export import export_packed, load_packed
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
    "export",
    "export_packed",
    "fake_quantize",
    "load_packed",
    "model_bits_report",
    "models",
    "ops",
    "preservation",
    "quantize_model",
    "quantized_layers",
    "trainer",
]
