"""The twin of a compressed model that the ONNX export traces: its quantized layers hold integer codes.

:func:`_plan` reads each quantized layer's codes, scales and group widths; :func:`_integer_twin` copies
the model with each quantized layer replaced by an integer module (:class:`_IntegerLinear`,
:class:`_IntegerConv2d`, :class:`_IntegerEmbedding`, :class:`_IntegerMultiheadAttention`) whose weight
an :class:`_IntegerWeight` dequantizes in the graph, and describes each layer as an :class:`OnnxLayer`.

Layouts. Codes are stored in the layout their consumer reads, so nothing is transposed at run
time: a conv weight as ``(out, in/groups, kh, kw)``, a linear weight transposed, ``(in, out)``, for
``MatMul``. When a group spans several rows or columns (one group per attention head, or per conv
feature map of the paper CNN's classifier, ``group_by="input"``), the group axis is split out,
``(in, G, out/G)`` or ``(G, in/G, out)``, so the per-axis scale has exactly one entry per group, and
a ``Reshape`` restores the weight's shape. Each integer type a layer's groups need is its own
``DequantizeLinear`` (see :class:`_IntegerWeight`); pruned groups store nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sgsc.export import codec
from sgsc.export.onnx_op import dequantize_linear, onnx_integer_type
from sgsc.export.writer import integer_codes
from sgsc.nn import QConv1d, QConv2d, QEmbedding, QLinear, QMultiheadAttention, quantized_layers
from sgsc.nn.conv_transpose import QConvTranspose1d, QConvTranspose2d
from sgsc.nn.recurrent import _QRecurrent
from sgsc.ops.spec import MAX_WIDTH

_TORCH_STORAGE = {"INT2": torch.int8, "INT4": torch.int8, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32}


@dataclass
class OnnxLayer:
    name: str
    shape: list[int]  # the weight's shape
    groups: int
    stored: dict[str, int]  # integer type -> how many of the layer's groups it holds
    dropped: int  # all-zero (pruned) groups: stored as nothing, their weights are a Pad's zeros


# ---- the twin the exporter traces ----------------------------------------------------------------


def _grouped_layout(codes: torch.Tensor, axis: int, groups: int) -> torch.Tensor:
    """``codes`` with ``axis`` split into ``(groups, size / groups)`` when a group spans several slices,
    so that ``axis`` indexes groups."""
    size = codes.shape[axis]
    if groups == size:
        return codes
    return codes.reshape(*codes.shape[:axis], groups, size // groups, *codes.shape[axis + 1:])


class _IntegerWeight(nn.Module):
    """A quantized layer's codes by width class; calling it gives the weight, dequantized in the graph.

    The groups of each integer type (INT2 ... INT32) are one ``DequantizeLinear`` of their own, so a
    layer whose groups range from 3 to 6 bits stores INT4 and INT8 codes, not everything in INT8 (the
    paper CNN's file is ~25% smaller so). All-zero groups store nothing: a ``Pad`` appends one zero
    group. Classes are concatenated along the group axis and a ``Gather`` puts groups back in order.
    A layer with no nonzero group keeps its codes as one class of the smallest type (a Pad of
    nothing would have no group to pad); a weight with no elements (a fully pruned MLP) is a constant.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, widths: torch.Tensor, axis: int,
                 shape: tuple[int, ...], opset: int):
        super().__init__()
        self.axis, self.shape = axis, shape
        self.stored: dict[str, int] = {}
        self.dropped = 0
        self.register_buffer("order", None)
        if codes.numel() == 0:
            return
        types = [onnx_integer_type(int(w), opset) if w > 0 else None for w in widths.tolist()]
        if all(t is None for t in types):
            types = [onnx_integer_type(1, opset)] * len(types)
        order = []
        for name in _TORCH_STORAGE:
            members = [g for g, t in enumerate(types) if t == name]
            if not members:
                continue
            index = torch.tensor(members)
            self.register_buffer(f"codes_{name}", codes.index_select(axis, index).to(_TORCH_STORAGE[name]))
            self.register_buffer(f"scale_{name}", scales.index_select(0, index).to(torch.float32))
            self.stored[name] = len(members)
            order += members
        self.dropped = len(types) - len(order)
        position = {g: i for i, g in enumerate(order)}
        gather = [position.get(g, len(order)) for g in range(len(types))]  # a dropped group reads the Pad's zeros
        if gather != list(range(len(types))):
            self.order = torch.tensor(gather, dtype=torch.int32)

    def forward(self) -> torch.Tensor:
        if not self.stored:
            return torch.zeros(self.shape)
        parts = [dequantize_linear(getattr(self, f"codes_{name}"), getattr(self, f"scale_{name}"), self.axis)
                 for name in self.stored]
        weight = parts[0] if len(parts) == 1 else torch.cat(parts, self.axis)
        if self.dropped:
            pad = [0, 0] * (weight.dim() - 1 - self.axis) + [0, 1]  # F.pad lists the last axis first
            weight = F.pad(weight, pad)
        if self.order is not None:
            weight = weight.index_select(self.axis, self.order)
        return weight if tuple(weight.shape) == self.shape else weight.reshape(self.shape)


def _frozen(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().cpu().clone(), requires_grad=False)


class _IntegerLinear(nn.Module):
    """``x @ W^T + b`` with ``W^T`` dequantized in ``(in, out)`` layout: what ``MatMul`` reads, no transpose."""

    def __init__(self, weight: _IntegerWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight())
        return y if self.bias is None else y + self.bias


class _IntegerEmbedding(nn.Module):
    """An embedding table dequantized in the graph: ``Gather`` reads the ``DequantizeLinear`` output."""

    def __init__(self, layer: QEmbedding, weight: _IntegerWeight):
        super().__init__()
        self.weight, self.padding_idx = weight, layer.padding_idx

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight(), self.padding_idx)


class _IntegerMultiheadAttention(nn.Module):
    """QMultiheadAttention's forward over integer projections (its ``projections`` is the one difference)."""

    def __init__(self, attention: QMultiheadAttention, in_weight: _IntegerWeight, out_weight: _IntegerWeight):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = attention.embed_dim, attention.num_heads, attention.head_dim
        self.dropout, self.batch_first, self.add_zero_attn = attention.dropout, attention.batch_first, attention.add_zero_attn
        self.in_weight, self.out_weight = in_weight, out_weight
        self.in_bias, self.out_bias = _frozen(attention.in_proj.bias), _frozen(attention.out_proj.bias)

    def projections(self):
        return self.in_weight(), self.in_bias, self.out_weight(), self.out_bias

    forward = QMultiheadAttention.forward
    # what nn.TransformerEncoderLayer reads of its attention, as QMultiheadAttention provides it
    _qkv_same_embed_dim = QMultiheadAttention._qkv_same_embed_dim

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_bias


class _IntegerConv2d(nn.Module):
    """A convolution (1-D or 2-D, as ``layer``) over a weight dequantized in the graph."""

    def __init__(self, layer: QConv1d | QConv2d, weight: _IntegerWeight, bias: torch.Tensor | None):
        super().__init__()
        self.convolve = F.conv2d if isinstance(layer, QConv2d) else F.conv1d
        self.weight = weight
        self.bias = _frozen(bias)
        self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
        # as nn.Conv2d._conv_forward: a padding mode other than zeros pads explicitly, then convolves unpadded
        self.padding = layer.padding if layer.padding_mode == "zeros" else 0
        self.explicit_pad = None if layer.padding_mode == "zeros" else (layer._reversed_padding_repeated_twice,
                                                                         layer.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad[0], mode=self.explicit_pad[1])
        return self.convolve(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class _IntegerRecurrent(nn.Module):
    """QLSTM/QGRU's forward over integer matrices (its ``flat_weights`` is the one difference)."""

    forward = _QRecurrent.forward

    def __init__(self, recurrent: _QRecurrent, weights: dict[str, _IntegerWeight]):
        super().__init__()
        for name in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional"):
            setattr(self, name, getattr(recurrent, name))
        self.matrices = nn.ModuleDict(weights)
        self.biases = nn.ParameterDict({name: _frozen(child.bias) for name, child in recurrent.named_children()
                                        if child.bias is not None})

    def flat_weights(self) -> list[torch.Tensor]:
        names, flat = list(self.matrices), []
        for ih, hh in zip(names[::2], names[1::2]):  # per layer and direction: w_ih, w_hh, b_ih, b_hh
            flat += [self.matrices[ih](), self.matrices[hh]()]
            flat += [self.biases[ih], self.biases[hh]] if self.bias else []
        return flat


class _IntegerConvTranspose(nn.Module):
    """A transposed convolution (1-D or 2-D, as ``layer``) over a weight dequantized in the graph."""

    def __init__(self, layer: QConvTranspose1d | QConvTranspose2d, weight: _IntegerWeight,
                 bias: torch.Tensor | None):
        super().__init__()
        self.transpose = F.conv_transpose2d if isinstance(layer, QConvTranspose2d) else F.conv_transpose1d
        self.weight, self.bias = weight, _frozen(bias)
        self.options = (layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transpose(x, self.weight(), self.bias, *self.options)


@dataclass
class _LayerPlan:
    name: str
    layer: QLinear | QConv2d
    codes: torch.Tensor  # (G, L), int64
    scales: torch.Tensor  # (G,), float32
    widths: torch.Tensor  # (G,), each group's minimal width
    bias: torch.Tensor | None


def _check_widths(name: str, widths: torch.Tensor) -> None:
    too_wide = (widths > MAX_WIDTH).nonzero().flatten()
    if too_wide.numel():
        g = int(too_wide[0])
        raise ValueError(
            f"layer {name!r} group {g} needs {int(widths[g])} bits, more than ONNX's widest integer type "
            f"(INT32) holds: at b >= 32 the float32 clamp bound 2^31 - 1 rounds to 2^31; lower that group's "
            "bit depth before exporting"
        )


def _plan(model: nn.Module) -> list[_LayerPlan]:
    plans = []
    for name, layer in quantized_layers(model):
        codes, scales = integer_codes(layer)
        codes, scales = codes.cpu(), scales.cpu()
        widths = codec.minimal_widths(codes)
        _check_widths(name, widths)
        plans.append(_LayerPlan(name, layer, codes, scales, widths, getattr(layer, "bias", None)))  # embeddings have none
    if not plans:
        raise ValueError(
            f"model ({type(model).__name__}) has no quantized layers, so there are no integer "
            "weights to export; export a compressed model (sgsc.nn.quantize_model, a checkpoint) "
            "or a packed file's path, or use torch.onnx.export for a float model"
        )
    return plans


def _rows_weight(plan: _LayerPlan, opset: int) -> _IntegerWeight:
    """The weight in its own ``(out, ...)`` layout, its groups along the axis they run on."""
    layer = plan.layer
    codes = layer.ungrouped(plan.codes)
    axis = 0 if layer.group_by == "output" else 1
    return _IntegerWeight(_grouped_layout(codes, axis, layer.quant_groups), plan.scales, plan.widths, axis,
                          tuple(codes.shape), opset)


def _describe(plan: _LayerPlan, weight: _IntegerWeight) -> OnnxLayer:
    return OnnxLayer(plan.name, list(plan.layer.weight.shape), plan.layer.quant_groups, weight.stored, weight.dropped)


def _integer_module(plan: _LayerPlan, opset: int) -> tuple[nn.Module, OnnxLayer]:
    layer = plan.layer
    codes = layer.ungrouped(plan.codes)  # the weight's shape
    if isinstance(layer, QEmbedding):
        weight = _rows_weight(plan, opset)
        module = _IntegerEmbedding(layer, weight)
    elif isinstance(layer, (QConv1d, QConv2d)):
        weight = _rows_weight(plan, opset)
        module = _IntegerConv2d(layer, weight, plan.bias)
    elif isinstance(layer, (QConvTranspose1d, QConvTranspose2d)):  # output channels along dim 1
        weight = _IntegerWeight(_grouped_layout(codes, 1, layer.quant_groups), plan.scales, plan.widths, 1,
                                tuple(codes.shape), opset)
        module = _IntegerConvTranspose(layer, weight, plan.bias)
    else:
        axis = 1 if layer.group_by == "output" else 0  # of the transposed (in, out) weight
        weight = _IntegerWeight(_grouped_layout(codes.t(), axis, layer.quant_groups), plan.scales, plan.widths,
                                axis, (layer.in_features, layer.out_features), opset)
        module = _IntegerLinear(weight, plan.bias)
    return module, _describe(plan, weight)


def _integer_twin(model: nn.Module, plans: list[_LayerPlan], opset: int):
    """A CPU copy of ``model`` in eval mode with each quantized layer replaced by its integer module.

    A QMultiheadAttention is replaced whole, its two projections' codes in their own layouts, since
    ``F.multi_head_attention_forward`` reads the weights rather than calling the projections.
    """
    from sgsc.nn import replace_submodule

    by_name = {plan.name: plan for plan in plans}
    attentions = {name: module for name, module in model.named_modules() if isinstance(module, QMultiheadAttention)}
    recurrents = {name: module for name, module in model.named_modules() if isinstance(module, _QRecurrent)}
    whole = {**attentions, **recurrents}
    replaced = list(whole) + [name for name in by_name if name.rpartition(".")[0] not in whole]
    # deepcopy with the replaced modules left out: their float weights are never needed again
    memo = {id(model.get_submodule(name)): nn.Identity() for name in replaced}
    twin = copy.deepcopy(model, memo).cpu().eval()
    described = []
    for name, attention in attentions.items():
        in_plan, out_plan = by_name[f"{name}.in_proj"], by_name[f"{name}.out_proj"]
        in_weight, out_weight = _rows_weight(in_plan, opset), _rows_weight(out_plan, opset)
        replace_submodule(twin, name, _IntegerMultiheadAttention(attention, in_weight, out_weight))
        described += [_describe(in_plan, in_weight), _describe(out_plan, out_weight)]
    for name, recurrent in recurrents.items():
        children = [by_name[f"{name}.{child}"] for child, _ in recurrent.named_children()]
        weights = {plan.name.rpartition(".")[2]: _rows_weight(plan, opset) for plan in children}
        replace_submodule(twin, name, _IntegerRecurrent(recurrent, weights))
        described += [_describe(plan, weights[plan.name.rpartition(".")[2]]) for plan in children]
    for plan in plans:
        if plan.name.rpartition(".")[0] in whole:
            continue
        module, description = _integer_module(plan, opset)
        replace_submodule(twin, plan.name, module)
        described.append(description)
    return twin, described
