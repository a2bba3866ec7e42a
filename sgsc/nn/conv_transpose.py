"""Quantized transposed convolutions: ``QConvTranspose1d`` and ``QConvTranspose2d``.

A transposed convolution stores its weight as ``(in_channels, out_channels / groups, *kernel)``, so its
output channels run along dimension 1. Each output channel gets one (bits, exponent) group, as a
convolution's does: :meth:`grouped` moves the output channels to the front, which is the layout the op
quantizes and the packed file stores. Only ``groups == 1`` is quantized (with channel groups, an output
channel's weights would be scattered over several input-channel blocks); ``quantize_model`` leaves the
others in float and says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgsc.nn.layers import _Quantized
from sgsc.ops import fake_quantize


class _QConvTranspose(_Quantized):
    """What QConvTranspose1d and QConvTranspose2d share; mixed in ahead of the nn layer they extend."""

    OUTPUT_AXIS = 1
    _spatial_dims: int

    def __init__(self, *args, quant_groups: int | None = None, init_bits: float = 8, rounding: str = "nearest",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.groups != 1:
            raise ValueError(f"only groups=1 is quantized, got groups={self.groups}")
        self._init_quantizer(quant_groups, init_bits, rounding)

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvTransposeNd, *, quant_groups: int | None = None,
                   init_bits: float = 8, rounding: str = "nearest"):
        """A quantized transposed conv that takes over ``conv``'s Parameters (shared, so tied weights stay tied)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.output_padding, conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode,
                  quant_groups=quant_groups, init_bits=init_bits, rounding=rounding, device="meta",
                  dtype=conv.weight.dtype)
        new.weight = conv.weight
        new.bias = conv.bias
        new._init_quantizer(quant_groups, init_bits, rounding)
        return new.train(conv.training)

    def grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(0, 1).reshape(self.quant_groups, -1)

    def ungrouped(self, grouped: torch.Tensor) -> torch.Tensor:
        in_channels, out_channels, *kernel = self.weight.shape
        return grouped.reshape(out_channels, in_channels, *kernel).transpose(0, 1)

    def quantized_weight(self) -> torch.Tensor:
        if self.weight.numel() == 0:
            return self.weight
        grouped = fake_quantize(self.grouped(self.weight), self.bits.float(), self.exponent.float(),
                                rounding=self.rounding)
        return self.ungrouped(grouped)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              self._spatial_dims, self.dilation)
        transpose = F.conv_transpose2d if self._spatial_dims == 2 else F.conv_transpose1d
        return transpose(x, self.quantized_weight(), self.bias, self.stride, self.padding, output_padding,
                         self.groups, self.dilation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


class QConvTranspose2d(_QConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose weight is fake-quantized per group of output channels (``groups=1``)."""

    _spatial_dims = 2


class QConvTranspose1d(_QConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` whose weight is fake-quantized per group of output channels (``groups=1``)."""

    _spatial_dims = 1
