"""Packed runtime modules: layers that run from their integer codes, holding nothing of float32 size.

- :class:`PackedLinear`: ``F.linear`` from bit-packed codes (:func:`sgsc.ops.packed_linear`, fused kernels).
- :class:`PackedConv2d`, :class:`PackedStreamLinear` (:mod:`sgsc.nn.packed_stream`): keep the file's own
  stream; a convolution dequantizes it per call into one shared buffer, then ``F.conv2d``; a linear layer
  computes ``x W^T + b`` from it in one op (``sgsc::unpack_linear``, a block of rows decoded at a time).
  Small linear layers take this form: the fused kernel's tiles cost them more memory (padding lanes,
  per-row tables) and, at their size, more time per call.
- :class:`PackedEmbedding`: the table as :func:`sgsc.ops.pack`'s stream (each group of rows at its
  width); a lookup decodes only the rows it returns.
- :func:`packed_module`: the packed layer for one quantized layer's codes (what a loader calls).
- :func:`pack_model`: every QLinear/QConv2d of a trained model replaced in place.
- :func:`resident_bytes`: every byte a model holds; :func:`packed_weight_bytes`, :func:`packed_file_bytes`:
  what the packed weights keep in memory, and the dense bit-packed size of the same codes (the file's), for
  the overhead ratio.
"""

from __future__ import annotations

import torch
from torch import nn

from sgsc.nn.convert import replace_submodule
from sgsc.nn.layers import QConv2d, QEmbedding, QLinear, QMultiheadAttention, quantized_layers
from sgsc.nn.packed_stream import WORKSPACE, PackedConv2d, PackedStreamLinear, StreamLayer, bit_stream
from sgsc.nn.recurrent import _QRecurrent
from sgsc.ops import packed as packed_ops
from sgsc.ops import reference
from sgsc.ops.spec import group_offsets

_BUFFERS = packed_ops.TENSOR_NAMES
# modules that hand their children's weights to a fused function instead of calling them
WEIGHT_READERS = (QMultiheadAttention, _QRecurrent)
# Linear layers of at most this many codes (256 KiB of float32 weight) keep the file's stream and compute
# from it (PackedStreamLinear, sgsc::unpack_linear): at this size a call costs its fixed overhead either way,
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

    Inputs must be float32; inference only (no gradient to the codes). ``activations="float"`` (default)
    computes with ``x`` as given (``F.linear``'s result within fp32 rounding); ``"int8"`` quantizes ``x``
    per block of 480 columns and multiplies in integer arithmetic (faster; within
    :func:`sgsc.ops.packed.int8_error_bound`). Set it at construction or on the attribute.
    """

    def __init__(self, weight: packed_ops.PackedWeight, bias: torch.Tensor | None = None, *, file_bytes: int = 0,
                 activations: str = "float"):
        super().__init__()
        packed_ops.check_activations(activations)
        self._set_weight(weight, bias, file_bytes)
        self.activations = activations

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
                                           self._buffers["bias"], self.activations)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (f", activations={self.activations!r}" if self.activations != "float" else ""))


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
        stream, widths = bit_stream(codes)
        return cls(stream, widths, scales, num_embeddings, embedding_dim, padding_idx, file_bytes=stream.numel())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, built on every access (for code that reads ``embedding.weight``, such as a
        head tied by ``F.linear(h, embedding.weight)``); it costs a float copy for as long as it is held."""
        return torch.ops.sgsc.unpack_dequantize(self.stream[:-_WINDOW_BYTES], self.widths, self.scales,
                                                self.rows_per_group, self.embedding_dim)

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
    QEmbedding. A QMultiheadAttention's projections are among them: it hands their ``weight`` to
    ``F.multi_head_attention_forward``, which a packed layer dequantizes from its codes on each access."""
    return {name: layer for name, layer in quantized_layers(model) if isinstance(layer, (QLinear, QConv2d, QEmbedding))}


@torch.no_grad()
def pack_model(model: nn.Module, *, activations: str = "float") -> nn.Module:
    """Replace every QLinear/QConv2d of ``model`` by its packed layer, in place; returns ``model`` in eval mode.

    ``activations`` is each :class:`PackedLinear`'s (``"float"``: exact within fp32 rounding; ``"int8"``:
    activations quantized per block of 480 columns, within :func:`sgsc.ops.packed.int8_error_bound`);
    convolutions and the small linear layers that keep the file's stream always take float activations.

    The layers are :func:`packable_layers`'; QConv1d layers and transposed convolutions stay as they
    are. An embedding tied to a linear layer (a tied head) becomes a PackedEmbedding and a
    PackedLinear holding the same codes.

    The codes are eq. (1)'s (``sgsc.ops.reference.integer_codes``, what the exporter writes), so the
    packed model computes with exactly the weights of the exported one.
    """
    packed_ops.check_activations(activations)
    for name, layer in packable_layers(model).items():
        if layer.quant_groups == 0 or layer.weight.numel() == 0:
            codes = torch.zeros(layer.quant_groups, 0, dtype=torch.int32)
            scales = torch.ones(layer.quant_groups)
        else:
            codes, scales = reference.integer_codes(layer.grouped(layer.weight.detach()), layer.bits.detach(),
                                                    layer.exponent.detach(), layer.rounding)
        device = layer.weight.device
        packed = packed_module(layer, codes.cpu(), scales.cpu().float(), getattr(layer, "bias", None))
        if isinstance(packed, PackedLinear):
            packed.activations = activations
        replace_submodule(model, name, packed.to(device))
    return model.eval()


def _packed_modules(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, (_PackedBase, StreamLayer, PackedEmbedding))]


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes the packed weights of ``model`` keep resident (codes and layout tables; biases and the convolutions'
    shared dequantization buffer, :func:`workspace_bytes`, not included): what the codes cost, against the file's."""
    return sum(m.weight_nbytes for m in _packed_modules(model))


def _held_tensors(module: nn.Module):
    """The tensors ``module`` itself holds: Parameters, buffers, and tensors kept as plain attributes (a cache, a
    layout table outside the buffers)."""
    yield from (t for t in module._parameters.values() if t is not None)
    yield from (t for t in module._buffers.values() if t is not None)
    yield from (t for t in vars(module).values() if isinstance(t, torch.Tensor))


def resident_bytes(model: nn.Module) -> int:
    """Bytes ``model`` keeps in memory: every tensor it holds (float Parameters and buffers, packed codes and
    their tables, tensors kept as attributes), each storage counted once however many tensors view it,
    plus :func:`workspace_bytes`, the shared buffer its convolutions dequantize into."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    storages: dict[tuple, int] = {}
    for module in model.modules():
        for tensor in _held_tensors(module):
            storage = tensor.untyped_storage()
            if storage.device.type != "meta":
                storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()) + workspace_bytes(model)


def workspace_bytes(model: nn.Module) -> int:
    """Bytes of the one buffer ``model``'s packed convolutions share (:data:`WORKSPACE`, per thread): the largest
    of their float32 weights. Convolutions that are never called do not grow it. The small linear layers keep no
    buffer of their own: ``sgsc::unpack_linear`` decodes into a fixed 64.5 KiB per thread, whatever the model (as
    ``sgsc::unpack`` keeps a fixed chunk)."""
    read_only = {id(child) for module in model.modules() if isinstance(module, WEIGHT_READERS)
                 for child in module.children()}
    return max((4 * m.out_features * m.in_features for m in _packed_modules(model)
                if isinstance(m, PackedConv2d) and id(m) not in read_only), default=0)


def packed_file_bytes(model: nn.Module) -> int:
    """The same codes' dense bit-packed size (each group at its minimal width): the file's code bytes,
    except that a file stores a mostly-zero group sparsely when that is smaller."""
    return sum(m.file_bytes for m in _packed_modules(model))


__all__ = ["PackedConv2d", "PackedEmbedding", "PackedLinear", "PackedStreamLinear", "WORKSPACE", "pack_model", "packable_layers", "packed_file_bytes", "packed_module",
           "packed_weight_bytes", "resident_bytes", "workspace_bytes"]
