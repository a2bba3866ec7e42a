"""The layer layer: quantized modules, model conversion, size accounting, the zoo and physical pruning.

- :mod:`~sgsc.nn.layers`: ``QLinear``, ``QConv1d``, ``QConv2d``, ``QEmbedding``, ``QMultiheadAttention``,
  ``QCausalSelfAttention`` (they call :mod:`sgsc.ops`);
- :mod:`~sgsc.nn.conv_transpose`: ``QConvTranspose1d``, ``QConvTranspose2d``;
- :mod:`~sgsc.nn.recurrent`: ``QLSTM``, ``QGRU`` (one bit depth per gate row);
- :mod:`~sgsc.nn.convert`: ``quantize_model`` for any ``nn.Module``;
- :mod:`~sgsc.nn.size`: the differentiable size term and the payload report;
- :mod:`~sgsc.nn.zoo`: the paper's CNN and the character decoder, rebuilt from their configs;
- :mod:`~sgsc.nn.graph_pruning`: removing zero-bit channels, heads and hidden units from any model.

Imports only :mod:`sgsc.ops` from the package.
"""

from sgsc.nn.conv_transpose import QConvTranspose1d, QConvTranspose2d
from sgsc.nn.convert import quantize_model, replace_submodule
from sgsc.nn.layers import (
    QCausalSelfAttention,
    QConv1d,
    QConv2d,
    QEmbedding,
    QLinear,
    QMultiheadAttention,
    quantized_layers,
)
from sgsc.nn.recurrent import QGRU, QLSTM
from sgsc.nn.size import average_bits, model_bits_report, storage_bits

__all__ = [
    "QCausalSelfAttention",
    "QConv1d",
    "QConv2d",
    "QConvTranspose1d",
    "QConvTranspose2d",
    "QEmbedding",
    "QGRU",
    "QLSTM",
    "QLinear",
    "QMultiheadAttention",
    "average_bits",
    "model_bits_report",
    "quantize_model",
    "quantized_layers",
    "replace_submodule",
    "storage_bits",
]
