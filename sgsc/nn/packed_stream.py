"""Packed layers that keep the file's own bit stream: :class:`PackedConv2d` and :class:`PackedStreamLinear`.

Each holds :func:`sgsc.ops.pack`'s stream (each group of output rows at its minimal width) plus a width
byte and a float32 scale per group. A convolution dequantizes it on every call with
``sgsc::unpack_dequantize`` into :data:`WORKSPACE`, one float32 buffer per device and thread grown to the
largest convolution, then runs ``F.conv2d``; a linear layer runs ``sgsc::unpack_linear``, which decodes a
block of rows and columns at a time into a fixed per-thread buffer and multiplies it there: resident memory is
the file's, plus that one buffer.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from sgsc.ops import functional
from sgsc.ops.spec import minimal_widths


class _Workspace(threading.local):
    """One float32 buffer per device, grown to the largest weight asked for: every packed convolution
    dequantizes into it, so a model holds one dequantized layer at a time.

    Each thread has its own (a ``threading.local``): threads serving one model concurrently never write
    into a weight another is reading, and a thread's buffers go when it ends."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}  # (device, shape) -> view of the current buffer

    def view(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The buffer's first elements as a tensor of ``shape``: a layer's view is made once (a packed layer
        runs on every token, and slicing and viewing cost more than a small layer's dequantization)."""
        view = self._views.get((device, shape))
        if view is None:
            numel, buffer = math.prod(shape), self._buffers.get(device)
            if buffer is None or buffer.numel() < numel:
                buffer = torch.empty(numel, dtype=torch.float32, device=device)
                self._buffers[device] = buffer
                self._views = {key: v for key, v in self._views.items() if key[0] != device}  # of the old one
            view = buffer[:numel].view(shape)
            self._views[(device, shape)] = view
        return view

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


WORKSPACE = _Workspace()


def bit_stream(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped int codes ``(G, L)`` -> :func:`sgsc.ops.pack`'s uint8 stream at each group's minimal width,
    and those widths (uint8)."""
    codes = codes.to(torch.int32).contiguous()
    widths = minimal_widths(codes).to(torch.uint8)
    return functional.pack(codes, widths), widths


class StreamLayer(nn.Module):
    """A weight kept as :func:`sgsc.ops.pack`'s stream (the file's bytes) with, per group of output rows,
    a width byte and a float32 scale; ``sgsc::unpack_dequantize`` rebuilds the float32 weight when the
    layer runs."""

    out_features: int
    in_features: int  # codes per output row
    file_bytes: int

    def _set_stream(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    out_features: int, in_features: int) -> None:
        """``codes``: int ``(G, L)``, group ``g`` the rows ``[g * O / G, (g + 1) * O / G)`` in order, each
        row ``in_features`` codes."""
        groups = scales.numel()
        if codes.numel() != out_features * in_features or (groups == 0) != (out_features == 0) or (
                groups and out_features % groups):
            raise ValueError(f"codes must hold {out_features} rows of {in_features} codes in groups of rows, one "
                             f"per scale, got {codes.numel()} codes and {groups} scales")
        # a layer with no output rows (all pruned) stores nothing, and sgsc.ops.pack needs a group
        empty = (torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8))
        stream, widths = bit_stream(codes.reshape(groups, -1)) if groups else empty
        self.register_buffer("stream", stream)
        self.register_buffer("widths", widths)
        self.register_buffer("scales", scales.detach().to(torch.float32).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.out_features, self.in_features = out_features, in_features
        self.rows_per_group, self.file_bytes = out_features // max(groups, 1), self.stream.numel()

    @property
    def weight_nbytes(self) -> int:
        """Resident bytes of the packed weight: the stream, a width byte and a float32 scale per group."""
        return sum(t.numel() * t.element_size() for t in (self.stream, self.widths, self.scales))

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``(out_features, in_features)`` weight, exactly ``code * scale``, in a fresh tensor."""
        if self.out_features == 0:
            return self.scales.new_zeros(0, self.in_features)
        return torch.ops.sgsc.unpack_dequantize(self.stream, self.widths, self.scales, self.rows_per_group,
                                                self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in ``nn.Linear``/``nn.Conv2d``'s shape, built on every access."""
        return self.dequantized_weight().reshape(self.weight_shape)

    def _check_input(self, x, device: torch.device) -> None:
        # torch's own errors (RuntimeError, not naming x) would come from deep inside F.linear / F.conv2d
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            raise TypeError(f"x must be a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        dim, expected = self.input_dim, self.input_features
        if x.dim() < -dim or x.shape[dim] != expected:
            raise ValueError(f"x must have {expected} features in dimension {dim}, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"x must be on the layer's device {device}, got {x.device}")


class PackedStreamLinear(StreamLayer):
    """``nn.Linear`` for small layers: its weight stays as the file's bit-packed stream, and each call computes
    ``x W^T + b`` from it with ``sgsc::unpack_linear`` (``F.linear``'s result within the fp32 bound of a dot
    product of length ``in_features``; the weights themselves exact). Where autograd would need the weight
    (``x`` requires grad), ``F.linear`` on a dequantized copy."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                 in_features: int):
        super().__init__()
        self._set_stream(codes, scales, bias, out_features, in_features)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    input_dim = -1  # x is (..., in_features)

    @property
    def input_features(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        if isinstance(x, torch.Tensor) and self.out_features and not (x.requires_grad and torch.is_grad_enabled()):
            # One op computes from the stream and checks every argument itself: on a 64x64 layer a check or
            # a reshape in Python costs as much as the product, so Python looks at x only once the op refused it.
            try:
                return torch.ops.sgsc.unpack_linear.default(x, buffers["stream"], buffers["widths"], buffers["scales"],
                                                            self.rows_per_group, self.in_features, buffers["bias"])
            except (ValueError, RuntimeError):
                self._check_input(x, buffers["stream"].device)  # names what is wrong with x
                raise
        # autograd saves the weight for the backward pass (the op has none); a layer without rows has no stream
        self._check_input(x, buffers["stream"].device)
        return F.linear(x, self.dequantized_weight(), buffers["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedConv2d(StreamLayer):
    """``nn.Conv2d`` whose weight stays bit-packed; each call dequantizes it into the shared :data:`WORKSPACE`
    (the calling thread's), or into a fresh tensor where autograd would save the weight for a backward pass.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *, in_channels: int,
                 out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros"):
        super().__init__()
        self._set_stream(codes, scales, bias, out_channels, in_channels // groups * math.prod(kernel_size))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), stride, padding
        self.dilation, self.groups, self.padding_mode = dilation, groups, padding_mode

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, codes: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None = None) -> PackedConv2d:
        """``conv``'s hyper-parameters with its weight's int ``codes`` (``(G, L)``, groups of output channels)."""
        return cls(codes, scales, bias, in_channels=conv.in_channels, out_channels=conv.out_channels,
                   kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                   groups=conv.groups, padding_mode=conv.padding_mode)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    input_dim = -3  # x is (N, C, H, W) or (C, H, W)

    @property
    def input_features(self) -> int:
        return self.in_channels

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight for one call on ``x``: in the shared :data:`WORKSPACE`, unless autograd would save it
        for a backward pass or torch.compile traces the call (then in a tensor of its own).

        Buffers are read from ``_buffers`` and the op through its ``default`` overload: on a small layer the
        module attribute lookups and overload resolution cost as much as the dequantization itself."""
        buffers = self._buffers
        stream = buffers["stream"]
        if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling() or not self.out_features:
            return self.dequantized_weight().view(self.weight_shape)
        weight = WORKSPACE.view(self.weight_shape, stream.device)
        torch.ops.sgsc.unpack_dequantize_out.default(stream, buffers["widths"], buffers["scales"], self.rows_per_group,
                                                     self.in_features, weight)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op and F.conv2d check x themselves; Python looks at it only once they refused it, to name what is
        # wrong (at batch 1 the checks cost a tenth of a small convolution).
        try:
            weight, bias = self._weight_for(x), self._buffers["bias"]
            if self.padding_mode != "zeros":
                pad = [p for p in reversed(self.padding) for _ in range(2)]
                return F.conv2d(F.pad(x, pad, mode=self.padding_mode), weight, bias, self.stride, 0, self.dilation,
                                self.groups)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        except (AttributeError, RuntimeError, TypeError, ValueError):
            self._check_input(x, self._buffers["stream"].device)
            raise

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")
