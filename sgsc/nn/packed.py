"""Packed runtime modules: layers that run from their integer codes, holding nothing of float32 size.

- :class:`PackedLinear`: ``F.linear`` from bit-packed codes (:func:`sgsc.ops.packed_linear`, fused kernels).
- :class:`PackedConv2d`, :class:`PackedStreamLinear`: keep the file's own stream (:func:`sgsc.ops.pack`:
  each group at its width, nothing else but a width and a scale per group) and dequantize it per call
  into one buffer shared by every such layer on the device (it grows to the largest), then
  ``F.conv2d`` / ``F.linear``. Small linear layers take this form: the fused kernel's tiles cost them
  more memory (padding lanes, per-row tables) than they save time.
- :class:`PackedEmbedding`: the table as :func:`sgsc.ops.pack`'s stream (each group of rows at its
  width); a lookup decodes only the rows it returns.
- :func:`packed_module`: the packed layer for one quantized layer's codes (what a loader calls).
- :func:`pack_model`: every QLinear/QConv2d of a trained model replaced in place.
- :func:`resident_bytes`, :func:`packed_file_bytes`: what the packed weights keep in memory, and the
  dense bit-packed size of the same codes (the file's), for the overhead ratio.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from sgsc.nn.convert import replace_submodule
from sgsc.nn.layers import QConv2d, QEmbedding, QLinear, QMultiheadAttention, quantized_layers
from sgsc.ops import functional, reference
from sgsc.ops import packed as packed_ops
from sgsc.ops.spec import group_offsets, minimal_widths

_BUFFERS = packed_ops.TENSOR_NAMES
# Linear layers of at most this many codes (256 KiB of float32 weight) keep the file's stream and
# dequantize per call (PackedStreamLinear): at this size a call costs its fixed overhead either way,
# and the fused kernel's tiles (8 lanes, padding and per-row tables) would hold 1.3-1.9x the file's
# bytes (the zoo's 64-wide decoder, the paper CNN's head).
STREAM_LINEAR_MAX_CODES = 1 << 16


class _PackedBase(nn.Module):
    """Holds a :class:`sgsc.ops.PackedWeight` as buffers (so ``.to(device)`` and ``state_dict`` see them)."""

    out_features: int
    in_features: int
    file_bytes: int  # the codes' dense bit-packed size (sgsc.ops.pack's layout), the overhead yardstick

    def _set_weight(self, weight: packed_ops.PackedWeight, bias: torch.Tensor | None, file_bytes: int) -> None:
        for name, tensor in zip(_BUFFERS, weight.tensors()):
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.out_features, self.in_features, self.file_bytes = weight.out_features, weight.in_features, file_bytes

    @property
    def packed_weight(self) -> packed_ops.PackedWeight:
        return packed_ops.PackedWeight(*(self._buffers[name] for name in _BUFFERS),
                                       out_features=self.out_features, in_features=self.in_features)

    def checked_layout(self) -> tuple[torch.Tensor, ...]:
        """The weight's tensors, checked in Python only where the op does not check them itself: the C++
        CPU op checks every tensor and index on each call, in a fraction of a microsecond; elsewhere
        (CUDA) they are checked again only when one was replaced or changed in place (``.to()``,
        ``load_state_dict``): on a small layer those checks cost more than the product."""
        tensors = tuple(map(self._buffers.__getitem__, _BUFFERS))
        if torch.compiler.is_compiling():  # the op's fake kernel checks the layout while tracing
            return tensors
        if tensors[0].is_cpu and packed_ops.NATIVE_CPU_CHECKS:
            return tensors
        # an inference tensor keeps no version counter: its identity is the stamp
        stamp = tuple((id(t), None if t.is_inference() else t._version) for t in tensors)
        if stamp != getattr(self, "_checked_stamp", None):
            packed_ops.check_weight(self.packed_weight)
            self._checked_stamp = stamp
        return tensors

    @property
    def weight_nbytes(self) -> int:
        """Resident bytes of the packed weight (words and tables; the bias is not counted)."""
        return self.packed_weight.nbytes

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight, exactly ``code * scale`` (for checks; the forward never builds it for Linear)."""
        return packed_ops.packed_dequantize(self.packed_weight)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in ``nn.Linear``/``nn.Conv2d``'s shape, built on every access: for code
        that reads ``layer.weight`` (a head tied by ``F.linear(h, embedding.weight)``); it costs a float
        copy for as long as it is held."""
        return self.dequantized_weight().reshape(self.weight_shape)


class PackedLinear(_PackedBase):
    """``nn.Linear`` whose weight stays bit-packed: ``y = x W^T + b`` computed from the codes.

    Inputs must be float32 (activations stay float); inference only (no gradient to the codes).
    """

    def __init__(self, weight: packed_ops.PackedWeight, bias: torch.Tensor | None = None, *, file_bytes: int = 0):
        super().__init__()
        self._set_weight(weight, bias, file_bytes)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                   group_by: str = "output") -> PackedLinear:
        """From int ``codes`` ``(out_features, in_features)`` and per-group ``scales`` (see :func:`sgsc.ops.pack_weight`)."""
        weight = packed_ops.pack_weight(codes, scales, group_by)
        return cls(weight, bias, file_bytes=packed_ops.file_bytes(codes, scales, group_by))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_ops.linear_on_checked(x, self.checked_layout(), self.out_features, self.in_features,
                                           self._buffers["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _Workspace(threading.local):
    """One float32 buffer per device, grown to the largest weight asked for: every stream layer (packed
    convolutions, small linears) dequantizes into it, so a model holds one dequantized layer at a time.

    Each thread has its own (a ``threading.local``): threads serving one model concurrently never write
    into a weight another is reading, and a thread's buffers go when it ends."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}  # (device, shape) -> view of the current buffer

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        buffer = self._buffers.get(device)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            self._buffers[device] = buffer
            self._views = {key: view for key, view in self._views.items() if key[0] != device}  # of the old one
        return buffer[:numel]

    def view(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The buffer's first elements as a tensor of ``shape``: a layer's view is made once (a packed layer
        runs on every token, and slicing and viewing cost more than a small layer's dequantization)."""
        view = self._views.get((device, shape))
        if view is None:
            view = self.take(math.prod(shape), device).view(shape)
            self._views[(device, shape)] = view
        return view

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


WORKSPACE = _Workspace()


class _StreamLayer(nn.Module):
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
        codes = codes.reshape(groups, -1 if groups else 0).to(torch.int32).contiguous()
        widths = minimal_widths(codes).to(torch.uint8)
        # a layer with no output rows (all pruned) stores nothing, and sgsc.ops.pack needs a group
        self.register_buffer("stream", functional.pack(codes, widths) if groups else torch.zeros(0, dtype=torch.uint8))
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

    def _weight_for(self, x: torch.Tensor, features_dim: int) -> torch.Tensor:
        """The weight for one call on ``x`` (whose dimension ``features_dim`` holds the layer's inputs): in
        the shared :data:`WORKSPACE`, unless autograd would save it for a backward pass or torch.compile
        traces the call (then in a tensor of its own)."""
        self._check_input(x, features_dim)
        if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling() or not self.out_features:
            return self.dequantized_weight().view(self.weight_shape)
        weight = WORKSPACE.view(self.weight_shape, self.stream.device)
        torch.ops.sgsc.unpack_dequantize_out(self.stream, self.widths, self.scales, self.rows_per_group,
                                             self.in_features, weight)
        return weight


    def _check_input(self, x, features_dim: int) -> None:
        # torch's own errors (RuntimeError, not naming x) would come from deep inside F.linear / F.conv2d
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            raise TypeError(f"x must be a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        expected = self.in_channels if isinstance(self, PackedConv2d) else self.in_features
        if x.dim() < -features_dim or x.shape[features_dim] != expected:
            raise ValueError(f"x must have {expected} features in dimension {features_dim}, got shape {tuple(x.shape)}")
        if x.device != self.stream.device:
            raise ValueError(f"x must be on the layer's device {self.stream.device}, got {x.device}")


class PackedStreamLinear(_StreamLayer):
    """``nn.Linear`` for small layers: its weight stays as the file's bit-packed stream and is dequantized
    into the shared :data:`WORKSPACE` on each call, then ``F.linear``. Inference only."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                 in_features: int):
        super().__init__()
        self._set_stream(codes, scales, bias, out_features, in_features)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight_for(x, -1), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedConv2d(_StreamLayer):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight_for(x, -3)
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            return F.conv2d(F.pad(x, pad, mode=self.padding_mode), weight, self.bias, self.stride, 0,
                            self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


# A code of up to 32 bits starting anywhere in a byte spans at most 5 bytes: the stream is padded by
# that much, so a lookup reads a fixed window of bytes without bounds checks.
_WINDOW_BYTES = 5


class PackedEmbedding(nn.Module):
    """``nn.Embedding`` whose table stays bit-packed: each group of rows at its own width, in
    :func:`sgsc.ops.pack`'s layout, with one power-of-two scale per group.

    A lookup decodes only the rows it returns, ``code * scale`` exactly as the float runtime's table
    holds them, so outputs are bit for bit those of ``nn.Embedding``. Inference only.
    """

    def __init__(self, stream: torch.Tensor, widths: torch.Tensor, scales: torch.Tensor, num_embeddings: int,
                 embedding_dim: int, padding_idx: int | None = None, *, file_bytes: int = 0):
        super().__init__()
        groups = widths.numel()
        if groups == 0 or num_embeddings % groups:
            raise ValueError(f"widths must hold one width per group of rows, and its {groups} groups must divide "
                             f"the {num_embeddings} rows")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.rows_per_group, self.file_bytes = num_embeddings // groups, file_bytes
        offsets = group_offsets(widths, self.rows_per_group * embedding_dim)
        if offsets[-1] != stream.numel():
            raise ValueError(f"stream must hold {int(offsets[-1])} bytes for these widths, got {stream.numel()}")
        self.register_buffer("stream", torch.cat([stream.to(torch.uint8), stream.new_zeros(_WINDOW_BYTES, dtype=torch.uint8)]))
        self.register_buffer("widths", widths.to(torch.uint8))
        # byte offsets in int32 where they fit (4 bytes a group instead of 8): a lookup widens them
        self.register_buffer("offsets", offsets[:-1].to(torch.int32 if stream.numel() < 2**31 else torch.int64))
        self.register_buffer("scales", scales.detach().to(torch.float32).clone())

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, num_embeddings: int, embedding_dim: int,
                   padding_idx: int | None = None) -> PackedEmbedding:
        """From int ``codes`` ``(G, rows_per_group * embedding_dim)`` (rows in order) and ``(G,)`` scales."""
        codes = codes.to(torch.int32).contiguous()
        widths = minimal_widths(codes)
        stream = functional.pack(codes, widths)
        return cls(stream, widths, scales, num_embeddings, embedding_dim, padding_idx, file_bytes=stream.numel())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, built on every access (for code that reads ``embedding.weight``, such as a
        head tied by ``F.linear(h, embedding.weight)``); it costs a float copy for as long as it is held."""
        codes = functional.unpack(self.stream[:-_WINDOW_BYTES], self.widths, self.rows_per_group, self.embedding_dim)
        scales = self.scales.repeat_interleave(self.rows_per_group).unsqueeze(1)
        return codes.to(torch.float32) * scales

    @property
    def weight_nbytes(self) -> int:
        """Resident bytes of the packed table: the stream and the per-group widths, offsets and scales."""
        return sum(t.numel() * t.element_size() for t in (self.stream, self.widths, self.offsets, self.scales))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"idx must be an integer tensor of token ids, got {getattr(idx, 'dtype', type(idx).__name__)}")
        rows = idx.reshape(-1).to(device=self.stream.device, dtype=torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_embeddings):
            raise IndexError(f"idx holds ids outside [0, {self.num_embeddings})")
        group = rows // self.rows_per_group
        width = self.widths[group].to(torch.int64).unsqueeze(1)  # (T, 1)
        first = self.offsets[group].to(torch.int64).unsqueeze(1) * 8 + (
            rows % self.rows_per_group).unsqueeze(1) * self.embedding_dim * width
        bit = first + torch.arange(self.embedding_dim, device=rows.device) * width  # (T, D): each code's first bit
        byte, shift = bit >> 3, bit & 7
        window = torch.zeros_like(bit)
        for k in range(_WINDOW_BYTES):
            window |= self.stream[byte + k].to(torch.int64) << (8 * k)
        unsigned = (window >> shift) & ((1 << width) - 1)
        sign = (unsigned >> (width - 1).clamp_min(0)) & (width > 0)  # width 0: a pruned group, all zeros
        codes = unsigned - (sign << width)
        out = codes.to(torch.float32) * self.scales[group].unsqueeze(1)
        return out.reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, groups={self.widths.numel()}" + (
            f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


def packed_module(layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None = None) -> PackedLinear | PackedConv2d | PackedEmbedding:
    """The packed layer for ``layer``'s integer codes.

    ``layer`` is a QLinear/QConv2d (on the meta device is fine: only its hyper-parameters, ``group_by``
    and grouped layout are read) or a plain nn.Linear/nn.Conv2d (output-row groups). ``codes`` are the
    int ``(G, L)`` codes in the layer's grouped layout (``sgsc.export.codec.decode``'s output reshaped
    to ``(G, -1)``), ``scales`` the float32 ``(G,)`` scales. ``bias`` defaults to ``layer.bias``.
    """
    if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.Embedding)):
        raise TypeError(f"layer must be a QLinear, QConv2d, QEmbedding or their nn base, got {type(layer).__name__}")
    if not isinstance(codes, torch.Tensor) or not isinstance(scales, torch.Tensor):
        raise TypeError("codes and scales must be tensors")
    groups = scales.numel()
    if codes.numel() != layer.weight.numel() or (groups and codes.reshape(groups, -1).shape[0] != groups):
        raise ValueError(f"codes must hold the layer's {layer.weight.numel()} codes in {groups} groups, "
                         f"got shape {tuple(codes.shape)}")
    if bias is None and getattr(layer, "bias", None) is not None:
        if layer.bias.is_meta:
            raise ValueError("layer.bias is on the meta device: load the plain state first or pass bias")
        bias = layer.bias
    grouped = codes.reshape(groups, -1) if groups else codes.reshape(0, 0)
    if isinstance(layer, nn.Embedding):
        return PackedEmbedding.from_codes(grouped, scales, layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
    if isinstance(layer, nn.Conv2d):
        return PackedConv2d.from_conv(layer, grouped, scales, bias)
    group_by = getattr(layer, "group_by", "output")
    if group_by == "input":
        matrix = layer.ungrouped(grouped)  # (G, O * I / G) -> (O, I)
    elif groups and 0 < codes.numel() <= STREAM_LINEAR_MAX_CODES:
        return PackedStreamLinear(grouped, scales, bias, layer.out_features, layer.in_features)
    else:
        matrix = grouped.reshape(layer.out_features, layer.in_features)
    return PackedLinear.from_codes(matrix, scales, bias, group_by=group_by)


def packable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized layers the packed runtime can replace (name -> layer): QLinear, QConv2d and
    QEmbedding, except a QMultiheadAttention's projections, whose weights it hands to
    ``F.multi_head_attention_forward`` (they stay quantized, or float on a loaded model)."""
    attention = {name for name, module in model.named_modules() if isinstance(module, QMultiheadAttention)}
    return {name: layer for name, layer in quantized_layers(model)
            if isinstance(layer, (QLinear, QConv2d, QEmbedding)) and name.rpartition(".")[0] not in attention}


@torch.no_grad()
def pack_model(model: nn.Module) -> nn.Module:
    """Replace every QLinear/QConv2d of ``model`` by its packed layer, in place; returns ``model`` in eval mode.

    The layers are :func:`packable_layers`'; QConv1d layers and attention projections stay as they
    are. An embedding tied to a linear layer (a tied head) becomes a PackedEmbedding and a
    PackedLinear holding the same codes.

    The codes are eq. (1)'s (``sgsc.ops.reference.integer_codes``, what the exporter writes), so the
    packed model computes with exactly the weights of the exported one.
    """
    for name, layer in packable_layers(model).items():
        if layer.quant_groups == 0 or layer.weight.numel() == 0:
            codes = torch.zeros(layer.quant_groups, 0, dtype=torch.int32)
            scales = torch.ones(layer.quant_groups)
        else:
            codes, scales = reference.integer_codes(layer.grouped(layer.weight.detach()), layer.bits.detach(),
                                                    layer.exponent.detach(), layer.rounding)
        device = layer.weight.device
        packed = packed_module(layer, codes.cpu(), scales.cpu().float(), getattr(layer, "bias", None))
        replace_submodule(model, name, packed.to(device))
    return model.eval()


def _packed_modules(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, (_PackedBase, _StreamLayer, PackedEmbedding))]


def resident_bytes(model: nn.Module) -> int:
    """Bytes the packed weights of ``model`` keep resident (codes and layout tables; biases and the
    shared dequantization buffer, :data:`WORKSPACE`, not included)."""
    return sum(m.weight_nbytes for m in _packed_modules(model))


def workspace_bytes(model: nn.Module) -> int:
    """Bytes of the one buffer ``model``'s stream layers (convolutions, small linears) share: the largest of
    their float32 weights."""
    return max((4 * m.out_features * m.in_features for m in _packed_modules(model) if isinstance(m, _StreamLayer)),
               default=0)


def packed_file_bytes(model: nn.Module) -> int:
    """The same codes' dense bit-packed size (each group at its minimal width): the file's code bytes,
    except that a file stores a mostly-zero group sparsely when that is smaller."""
    return sum(m.file_bytes for m in _packed_modules(model))


__all__ = ["PackedConv2d", "PackedEmbedding", "PackedLinear", "PackedStreamLinear", "WORKSPACE", "pack_model", "packable_layers", "packed_file_bytes", "packed_module",
           "resident_bytes", "workspace_bytes"]
