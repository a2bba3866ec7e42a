"""sgsc: Safety-Guided Self Compression for PyTorch.

The package is layered; each layer imports only those before it:

    sgsc.ops     eq. (1) and the bit packing as torch.ops.sgsc.* (C++ on CPU, Triton on CUDA)
    sgsc.nn      quantized layers, quantize_model, size accounting, the zoo, physical pruning
    sgsc.export  the packed file: write, read, inspect
    sgsc.train   Algorithm 1: the loop, preservation sets, safety checks, checkpoints, DDP
    sgsc.experiments, sgsc.cli

``import sgsc`` loads none of them: the names below are imported on first use, so ``import sgsc.ops``
costs only the op layer.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "fake_quantize": "sgsc.ops",
    "pack": "sgsc.ops",
    "unpack": "sgsc.ops",
    "QLinear": "sgsc.nn",
    "QConv1d": "sgsc.nn",
    "QConv2d": "sgsc.nn",
    "QConvTranspose1d": "sgsc.nn",
    "QConvTranspose2d": "sgsc.nn",
    "QEmbedding": "sgsc.nn",
    "QLSTM": "sgsc.nn",
    "QGRU": "sgsc.nn",
    "QMultiheadAttention": "sgsc.nn",
    "QCausalSelfAttention": "sgsc.nn",
    "quantize_model": "sgsc.nn",
    "quantized_layers": "sgsc.nn",
    "average_bits": "sgsc.nn",
    "model_bits_report": "sgsc.nn",
    "export_onnx": "sgsc.export",
    "load_packed": "sgsc.export",
    "save_packed": "sgsc.export",
    "read_header": "sgsc.export",
    "summarize": "sgsc.export",
    "PackedFileError": "sgsc.export",
    "CompressConfig": "sgsc.train",
    "CompressResult": "sgsc.train",
    "TrainConfig": "sgsc.train",
    "pack_model": "sgsc.nn.packed",
    "SelfCompression": "sgsc.train",
    "compress": "sgsc.train",
}
_SUBPACKAGES = ("ops", "nn", "export", "train", "experiments", "cli")

__all__ = sorted([*_PUBLIC, *_SUBPACKAGES, "__version__"])


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sgsc.{name}")
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'sgsc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
