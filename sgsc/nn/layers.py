"""Quantized layers with learnable per-group bit depths, and the helpers built on them.

A quantized layer holds its float ``weight`` plus two float32 Parameters of shape ``(G,)``:
``bits`` (b) and ``exponent`` (e). Its forward uses ``sgsc.fake_quantize(weight, bits, exponent)``
in place of ``weight``, so training moves b and e by the straight-through estimator, and a group
whose ``bits`` fall to ``<= 0`` contributes exact zeros (it is pruned). Group ``g`` covers output
rows ``[g*O/G, (g+1)*O/G)``; ``G`` defaults to one group per output channel. A QLinear built with
``group_by="input"`` groups input columns instead: group ``g`` covers columns ``[g*I/G, (g+1)*I/G)``
of every row, which lets a classifier learn one bit depth per feature map it reads.

The number of groups is called ``quant_groups`` everywhere, because ``nn.Conv2d.groups`` already
names the convolution's channel grouping.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from sgsc.ops import fake_quantize
from sgsc.ops.spec import MAX_WIDTH, ROUNDING_MODES


def check_init_bits(init_bits: float) -> float:
    if isinstance(init_bits, bool) or not isinstance(init_bits, Real):
        raise TypeError(f"init_bits must be a number, got {type(init_bits).__name__}")
    if not 1 <= init_bits <= MAX_WIDTH:
        raise ValueError(f"init_bits must be in [1, {MAX_WIDTH}], got {init_bits}")
    return float(init_bits)


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    return rounding


GROUP_BY = ("output", "input")


def _check_group_by(group_by: str) -> str:
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
    return group_by


def _resolve_quant_groups(quant_groups: int | None, dim: int, what: str = "output channels") -> int:
    if quant_groups is None:
        return dim
    if isinstance(quant_groups, bool) or not isinstance(quant_groups, int):
        raise TypeError(f"quant_groups must be an int or None, got {type(quant_groups).__name__}")
    if quant_groups <= 0 or dim % quant_groups != 0:
        raise ValueError(f"quant_groups must be a positive divisor of the {dim} {what}, got {quant_groups}")
    return quant_groups


def initial_exponent(weight: torch.Tensor, quant_groups: int, bits: float) -> torch.Tensor:
    """Per-group ``e = ceil(log2(max|w| / (2^(b-1) - 1)))``: the finest grid on which no weight clips.

    The largest magnitude then lands on at most the top code, so the starting error is at most half
    a step. An all-zero group gets ``e = 0`` (any grid represents it exactly); 1-bit groups, whose
    positive range is empty, size the grid from the negative code ``-1`` instead. A weight on the meta
    device has no values: its exponents are meta zeros (computing them would only import
    ``torch._dynamo``, seconds, for the decompositions of the meta kernels).
    """
    if weight.numel() == 0 or weight.is_meta:
        return torch.zeros(quant_groups, dtype=torch.float32, device=weight.device)
    peak = weight.detach().float().reshape(quant_groups, -1).abs().amax(dim=1)
    top_code = max(2.0 ** (bits - 1) - 1, 1.0)
    exponent = torch.ceil(torch.log2(peak / top_code))
    return torch.where(peak > 0, exponent, torch.zeros_like(exponent))


class _Quantized:
    """What QLinear and QConv2d share; mixed in ahead of the nn layer they extend."""

    weight: nn.Parameter
    bits: nn.Parameter
    exponent: nn.Parameter
    rounding: str
    group_by: str
    OUTPUT_AXIS = 0  # the weight's dimension of output channels (1 for a transposed convolution's)

    def _init_quantizer(self, quant_groups: int | None, init_bits: float, rounding: str, group_by: str = "output") -> None:
        self.group_by = _check_group_by(group_by)
        axis, what = (self.OUTPUT_AXIS, "output channels") if group_by == "output" else (1, "input features")
        dim = self.weight.shape[axis]
        groups = _resolve_quant_groups(quant_groups, dim, what) if dim else 0
        bits = check_init_bits(init_bits)
        self.rounding = check_rounding(rounding)
        self.bits = nn.Parameter(torch.full((groups,), bits, dtype=torch.float32, device=self.weight.device))
        self.exponent = nn.Parameter(initial_exponent(self.grouped(self.weight), groups, bits))

    @property
    def quant_groups(self) -> int:
        """``G``, the number of (bits, exponent) pairs of this layer."""
        return self.bits.numel()

    @property
    def elements_per_group(self) -> int:
        """Weights that share one group's bit depth."""
        return self.weight.numel() // self.quant_groups if self.quant_groups else 0

    def grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (shaped like the weight) as ``(G, numel / G)``: row ``g`` holds group ``g``'s elements.

        This is the layout the op quantizes and the packed file stores; :meth:`ungrouped` inverts it.
        """
        groups = self.quant_groups
        group_len = tensor.numel() // groups if groups else 0
        if self.group_by == "output":
            return tensor.reshape(groups, group_len)
        out_features, in_features = tensor.shape
        return tensor.reshape(out_features, groups, self._columns_per_group()).transpose(0, 1).reshape(groups, group_len)

    def ungrouped(self, grouped: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`grouped`: a ``(G, numel / G)`` tensor back in the weight's shape."""
        if self.group_by == "output":
            return grouped.reshape(self.weight.shape)
        out_features, in_features = self.weight.shape
        columns = grouped.reshape(self.quant_groups, out_features, self._columns_per_group())
        return columns.transpose(0, 1).reshape(out_features, in_features)

    def _columns_per_group(self) -> int:
        return self.weight.shape[1] // self.quant_groups if self.quant_groups else 0

    @torch.no_grad()
    def reset_quantizer(self, init_bits: float = 8) -> None:
        """Set every group to ``init_bits`` and re-fit the exponents to the current weights."""
        bits = check_init_bits(init_bits)
        self.bits.fill_(bits)
        self.exponent.copy_(initial_exponent(self.grouped(self.weight), self.quant_groups, bits))

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass sees it (differentiable to weight, bits and exponent)."""
        if self.weight.numel() == 0:
            return self.weight  # a fully pruned layer described by a zero-width config
        # .float() keeps the op's float32 contract after a model-wide .half()/.to(dtype)
        bits, exponent = self.bits.float(), self.exponent.float()
        if self.group_by == "output":
            return fake_quantize(self.weight, bits, exponent, rounding=self.rounding)
        return self.ungrouped(fake_quantize(self.grouped(self.weight), bits, exponent, rounding=self.rounding))

    def _quant_repr(self) -> str:
        group_by = "" if self.group_by == "output" else f", group_by={self.group_by!r}"
        return f"quant_groups={self.quant_groups}{group_by}, rounding={self.rounding!r}"


class QLinear(_Quantized, nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized per group of output rows (of input columns with
    ``group_by="input"``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_groups: int | None = None,
        init_bits: float = 8,
        rounding: str = "nearest",
        group_by: str = "output",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        with warnings.catch_warnings():
            # zero-width layers are legitimate here: they describe fully pruned heads or MLPs
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quantizer(quant_groups, init_bits, rounding, group_by)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, quant_groups: int | None = None, init_bits: float = 8, rounding: str = "nearest",
        group_by: str = "output",
    ) -> QLinear:
        """A QLinear that takes over ``linear``'s Parameters (shared, so tied weights stay tied)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            quant_groups=quant_groups,
            init_bits=init_bits,
            rounding=rounding,
            group_by=group_by,
            device="meta",
            dtype=linear.weight.dtype,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_quantizer(quant_groups, init_bits, rounding, group_by)
        return new.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


class _QConv(_Quantized):
    """What QConv1d and QConv2d share: every ``nn.ConvNd`` option (stride, padding modes, dilation,
    channel ``groups``) is supported, since quantization only replaces the weight the convolution reads."""

    def __init__(self, *args, quant_groups: int | None = None, init_bits: float = 8, rounding: str = "nearest",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizer(quant_groups, init_bits, rounding)

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, *, quant_groups: int | None = None, init_bits: float = 8,
                   rounding: str = "nearest"):
        """A quantized conv that takes over ``conv``'s Parameters (shared, so tied weights stay tied)."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode,
            quant_groups=quant_groups, init_bits=init_bits, rounding=rounding, device="meta", dtype=conv.weight.dtype,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new._init_quantizer(quant_groups, init_bits, rounding)
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


class QConv2d(_QConv, nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized per group of output channels.

    Takes ``nn.Conv2d``'s arguments, plus the keyword-only ``quant_groups``, ``init_bits`` and ``rounding``.
    """


class QConv1d(_QConv, nn.Conv1d):
    """``nn.Conv1d`` whose weight is fake-quantized per group of output channels."""


class QEmbedding(_Quantized, nn.Embedding):
    """``nn.Embedding`` whose table is fake-quantized per group of rows (tokens; one group per token by default).

    ``max_norm`` is not supported: it renormalises the float table in place on every lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 quant_groups: int | None = None, init_bits: float = 8, rounding: str = "nearest",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self._init_quantizer(quant_groups, init_bits, rounding)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, *, quant_groups: int | None = None, init_bits: float = 8,
                   rounding: str = "nearest") -> QEmbedding:
        """A QEmbedding that takes over ``embedding``'s table (shared, so a tied head stays tied)."""
        if embedding.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm renormalises its table in place; it cannot be quantized")
        new = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, quant_groups=quant_groups,
                  init_bits=init_bits, rounding=rounding, device="meta", dtype=embedding.weight.dtype)
        new.scale_grad_by_freq, new.sparse = embedding.scale_grad_by_freq, embedding.sparse
        new.weight = embedding.weight
        new._init_quantizer(quant_groups, init_bits, rounding)
        return new.train(embedding.training)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.quantized_weight(), self.padding_idx, None, 2.0, self.scale_grad_by_freq,
                           self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


def _weight_of(layer: nn.Module) -> torch.Tensor:
    """The weight a layer computes with: quantized for a quantized layer, as stored for a float one."""
    return layer.quantized_weight() if isinstance(layer, _Quantized) else layer.weight


class QMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (same forward signature) with per-head quantized projections.

    ``in_proj`` holds the packed q/k/v projection ``(3E, E)`` of ``nn.MultiheadAttention`` with one
    (bits, exponent) group per head of each of q, k and v (``3 * num_heads`` groups of ``head_dim``
    rows); ``out_proj`` groups its input columns per head (``group_by="input"``), so a head is one
    unit on both sides. Supported: ``kdim == vdim == embed_dim`` (the packed projection), no
    ``bias_k``/``bias_v``; :func:`sgsc.quantize_model` leaves other configurations in float and says why.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, *, add_zero_attn: bool = False, init_bits: float = 8,
                 rounding: str = "nearest", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        quant = {"init_bits": init_bits, "rounding": rounding, "device": device, "dtype": dtype}
        self.in_proj = QLinear(embed_dim, 3 * embed_dim, bias, quant_groups=3 * num_heads, **quant)
        self.out_proj = QLinear(embed_dim, embed_dim, bias, quant_groups=num_heads, group_by="input", **quant)

    # nn.TransformerEncoderLayer takes a fused fast path in eval mode when this is True, and that path
    # reads every float weight of the block directly: False keeps it on the path that calls the modules.
    _qkv_same_embed_dim = False

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """``nn.MultiheadAttention``'s name for the q/k/v bias, read by ``nn.TransformerEncoderLayer``."""
        return self.in_proj.bias

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, *, init_bits: float = 8, rounding: str = "nearest"):
        """A QMultiheadAttention that takes over ``mha``'s Parameters."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None:
            raise ValueError("only nn.MultiheadAttention with kdim == vdim == embed_dim and no bias_k/bias_v is supported")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.batch_first,
                  add_zero_attn=mha.add_zero_attn, init_bits=init_bits, rounding=rounding, device="meta",
                  dtype=mha.in_proj_weight.dtype)
        new.in_proj.weight, new.in_proj.bias = mha.in_proj_weight, mha.in_proj_bias
        new.out_proj.weight, new.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
        new.in_proj._init_quantizer(3 * mha.num_heads, init_bits, rounding)
        new.out_proj._init_quantizer(mha.num_heads, init_bits, rounding, "input")
        return new.train(mha.training)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(in_proj weight, its bias, out_proj weight, its bias)`` as the forward computes with them; an
        exporter's twin of this module swaps this method and keeps the forward."""
        return _weight_of(self.in_proj), self.in_proj.bias, _weight_of(self.out_proj), self.out_proj.bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        in_weight, in_bias, out_weight, out_bias = self.projections()
        output, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_weight, in_bias,
            None, None, self.add_zero_attn, self.dropout, out_weight, out_bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if self.batch_first and batched:
            output = output.transpose(0, 1)
        return output, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


QUANTIZED_TYPES = (QLinear, QConv1d, QConv2d, QEmbedding)
QuantizedLayer = QLinear | QConv1d | QConv2d | QEmbedding


class QCausalSelfAttention(nn.Module):
    """Multi-head causal self-attention whose projections are quantized per attention head.

    ``q_proj``, ``k_proj`` and ``v_proj`` map ``n_embd -> n_heads * head_dim`` with one
    (bits, exponent) group per head (the head's ``head_dim`` output rows), so a head's bit depth is
    learned as a unit and a head can be pruned whole. ``out_proj`` maps back to ``n_embd`` with one
    group per *output* channel, which lets ``out_proj`` prune its own outputs independently of the
    heads (a per-head group there would run along its input columns, ``group_by="input"``; not used).

    A pruned ``v_proj`` group turns its head's values into the constant ``v_proj`` bias slice, so
    the head adds the constant ``out_proj.weight[:, head] @ bias`` (nothing when ``bias=False``),
    which ``out_proj``'s bias can absorb when the head is removed physically. A pruned ``q_proj``
    or ``k_proj`` group only flattens that head's attention to a uniform average.
    ``n_heads == 0`` describes a block whose heads were all removed: it outputs ``out_proj``'s bias.
    ``n_heads * head_dim`` need not equal ``n_embd``, so pruned heads shrink the projections.
    """

    def __init__(
        self,
        n_embd: int,
        n_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        init_bits: float = 8,
        rounding: str = "nearest",
    ) -> None:
        super().__init__()
        for name, value, low in (("n_embd", n_embd, 1), ("n_heads", n_heads, 0), ("head_dim", head_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.n_embd, self.n_heads, self.head_dim = n_embd, n_heads, head_dim
        inner = n_heads * head_dim
        per_head = {"quant_groups": n_heads or None, "init_bits": init_bits, "rounding": rounding}
        self.q_proj = QLinear(n_embd, inner, bias, **per_head)
        self.k_proj = QLinear(n_embd, inner, bias, **per_head)
        self.v_proj = QLinear(n_embd, inner, bias, **per_head)
        self.out_proj = QLinear(inner, n_embd, bias, init_bits=init_bits, rounding=rounding)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, _ = x.shape
        return x.view(batch, time, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, _ = x.shape
        if self.n_heads == 0:
            return self.out_proj(x.new_zeros(batch, time, 0))
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(batch, time, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_heads={self.n_heads}, head_dim={self.head_dim}"


# ---- model-wide helpers --------------------------------------------------------------------


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLayer]]:
    """``(name, layer)`` for every quantized layer in ``model`` (those of :data:`QUANTIZED_TYPES` and the layers
    of other modules built on the same quantizer, such as :mod:`sgsc.nn.conv_transpose`'s), in ``named_modules`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, _Quantized):
            yield name, module


