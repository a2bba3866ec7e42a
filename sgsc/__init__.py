"""sgsc: Safety-Guided Self Compression for PyTorch."""

from sgsc import ops
from sgsc.ops import fake_quantize

__version__ = "0.1.0"

__all__ = ["__version__", "fake_quantize", "ops"]
