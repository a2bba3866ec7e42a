"""Quantized recurrent layers: ``QLSTM`` and ``QGRU``, with one bit depth per gate row.

``nn.LSTM``/``nn.GRU`` keep their matrices as flat Parameters (``weight_ih_l0``, ``weight_hh_l0``, ...,
``_reverse`` for the second direction). Here each (input or hidden) matrix of each layer and direction
is a :class:`~sgsc.nn.QLinear` child (``ih_l0``, ``hh_l0``, ``ih_l0_reverse``...) holding that matrix
and its bias, grouped per output row: one row is one gate of one hidden unit, so every gate-unit
learns its own bit depth. The children are never called: the forward hands their weights to the same
fused kernel ``nn.LSTM``/``nn.GRU`` run. So the packed file, its loader and the packed runtime see
ordinary linear layers: a loaded model's children are plain ``nn.Linear`` (float runtime) or packed
layers, whose ``weight`` this module reads on each call.
"""

from __future__ import annotations

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from sgsc.nn.layers import QLinear, _Quantized

MODES = {nn.LSTM: "LSTM", nn.GRU: "GRU"}


def _computed_weight(layer: nn.Module) -> torch.Tensor:
    return layer.quantized_weight() if isinstance(layer, _Quantized) else layer.weight


class _QRecurrent(nn.Module):
    """What QLSTM and QGRU share: the children per matrix and the call into the fused kernel."""

    mode: str

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 init_bits: float = 8, rounding: str = "nearest", device=None, dtype=None) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout, self.bidirectional = bias, batch_first, float(dropout), bidirectional
        gates = {"LSTM": 4, "GRU": 3}[self.mode] * hidden_size
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            for suffix in ("", "_reverse")[:directions]:
                inputs = input_size if layer == 0 else hidden_size * directions
                quant = {"init_bits": init_bits, "rounding": rounding, "device": device, "dtype": dtype}
                self.add_module(f"ih_l{layer}{suffix}", QLinear(inputs, gates, bias, **quant))
                self.add_module(f"hh_l{layer}{suffix}", QLinear(hidden_size, gates, bias, **quant))

    @classmethod
    def from_float(cls, rnn: nn.RNNBase, *, init_bits: float = 8, rounding: str = "nearest"):
        """A quantized copy that takes over ``rnn``'s Parameters (each matrix and bias becomes a child's)."""
        if type(rnn) not in MODES or MODES[type(rnn)] != cls.mode:
            raise TypeError(f"{cls.__name__}.from_float takes an nn.{cls.mode}, got {type(rnn).__name__}")
        if getattr(rnn, "proj_size", 0):
            raise ValueError("an nn.LSTM with proj_size > 0 is not quantized")
        new = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first, rnn.dropout,
                  rnn.bidirectional, init_bits=init_bits, rounding=rounding, device="meta",
                  dtype=rnn.weight_ih_l0.dtype)
        for name, child in new.named_children():
            child.weight = getattr(rnn, f"weight_{name}")
            child.bias = getattr(rnn, f"bias_{name}") if rnn.bias else None
            child._init_quantizer(None, init_bits, rounding)
        return new.train(rnn.training)

    def flat_weights(self) -> list[torch.Tensor]:
        """The weights in ``nn.LSTM``'s ``_flat_weights`` order (per layer and direction: w_ih, w_hh, b_ih, b_hh),
        as the forward computes with them; an exporter's twin swaps this method and keeps the forward."""
        weights = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[:2 if self.bidirectional else 1]:
                ih, hh = getattr(self, f"ih_l{layer}{suffix}"), getattr(self, f"hh_l{layer}{suffix}")
                weights += [_computed_weight(ih), _computed_weight(hh)]
                weights += [ih.bias, hh.bias] if self.bias else []
        return weights

    def forward(self, input: torch.Tensor, hx=None):
        if isinstance(input, PackedSequence):
            raise TypeError(f"{type(self).__name__} takes a padded tensor, not a PackedSequence")
        batched, batch_dim = input.dim() == 3, 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
            hx = None if hx is None else (tuple(h.unsqueeze(1) for h in hx) if self.mode == "LSTM" else hx.unsqueeze(1))
        if hx is None:
            zeros = input.new_zeros((1 + self.bidirectional) * self.num_layers, input.shape[batch_dim], self.hidden_size)
            hx = (zeros, zeros) if self.mode == "LSTM" else zeros
        run = _VF.lstm if self.mode == "LSTM" else _VF.gru
        output, *hidden = run(input, hx, self.flat_weights(), self.bias, self.num_layers, self.dropout, self.training,
                              self.bidirectional, self.batch_first)
        hidden = tuple(hidden) if self.mode == "LSTM" else hidden[0]
        if not batched:
            output = output.squeeze(batch_dim)
            hidden = tuple(h.squeeze(1) for h in hidden) if self.mode == "LSTM" else hidden.squeeze(1)
        return output, hidden

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}")


class QLSTM(_QRecurrent):
    """``nn.LSTM`` (same forward, no ``proj_size``, no PackedSequence) with one bit depth per gate row."""

    mode = "LSTM"


class QGRU(_QRecurrent):
    """``nn.GRU`` (same forward, no PackedSequence) with one bit depth per gate row."""

    mode = "GRU"


RECURRENT_SWAPS = {nn.LSTM: QLSTM, nn.GRU: QGRU}
