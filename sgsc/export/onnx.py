"""ONNX export with integer weights: each quantized layer's codes as integer initializers.

:func:`export_onnx` writes a model with ``QLinear``/``QConv2d`` layers, or a packed file, as an ONNX
file that onnxruntime runs, every quantized weight stored as its integer codes of eq. (1) and
dequantized in the graph::

    codes (INT2/INT4/INT8/INT16/INT32) --DequantizeLinear(per-group scale 2^e, zero point 0)--> Conv / MatMul

How the graph is made. torch's own exporter (``torch.onnx.export(..., dynamo=True)``) traces a twin of
the model in which each quantized layer holds its codes (int8/int16/int32 buffers) and per-group
scales and computes its weight with ``torch.ops.sgsc_onnx.dequantize_linear``, an op whose ONNX
translation is one ``DequantizeLinear``. So every other layer (BatchNorm, attention, GELU...) is
the exporter's, and the codes reach the file as integer initializers, never folded into float
constants. Afterwards the int8 initializers whose codes fit 4 or 2 bits are retyped to INT4/INT2
(torch has no such dtypes) and the exporter's debugging records are dropped.

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
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sgsc._deps import require
from sgsc._io import atomic_write
from sgsc.export import codec
from sgsc.export.format import printable
from sgsc.export.writer import integer_codes
from sgsc.nn import QConv1d, QConv2d, QEmbedding, QLinear, QMultiheadAttention, quantized_layers
from sgsc.ops.spec import MAX_WIDTH

# opset 21 brings INT4 (and per-axis/blocked DequantizeLinear of it), opset 25 INT2.
INT4_OPSET = 21
INT2_OPSET = 25


@torch.library.custom_op("sgsc_onnx::dequantize_linear", mutates_args=())
def dequantize_linear(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear`` with zero point 0: ``codes * scale`` with ``scale`` along ``axis``, in float32.

    Only the ONNX export traces it (its translation is one ``DequantizeLinear`` node); it lives here,
    not in :mod:`sgsc.ops.library`, because it is a marker for the exporter, not a kernel. Its
    arithmetic is the reader's: the code as float32 times the power-of-two scale, exact.
    """
    shape = [1] * codes.dim()
    shape[axis] = -1
    return codes.to(torch.float32) * scale.reshape(shape)


@dequantize_linear.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    torch._check(scale.dim() == 1, lambda: f"scale must be 1-D, got shape {tuple(scale.shape)}")
    torch._check(scale.numel() == codes.shape[axis],
                 lambda: f"scale has {scale.numel()} entries for axis {axis} of size {codes.shape[axis]}")
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def onnx_integer_type(width: int, opset: int) -> str:
    """The smallest signed ONNX integer type holding ``width``-bit two's-complement codes at ``opset``."""
    if width > MAX_WIDTH:
        raise ValueError(f"width must be at most {MAX_WIDTH}, got {width}")
    for name, bits, since in (("INT2", 2, INT2_OPSET), ("INT4", 4, INT4_OPSET), ("INT8", 8, 0), ("INT16", 16, 0)):
        if width <= bits and opset >= since:
            return name
    return "INT32"


_TORCH_STORAGE = {"INT2": torch.int8, "INT4": torch.int8, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32}


@dataclass
class OnnxLayer:
    name: str
    shape: list[int]  # the weight's shape
    groups: int
    stored: dict[str, int]  # integer type -> how many of the layer's groups it holds
    dropped: int  # all-zero (pruned) groups: stored as nothing, their weights are a Pad's zeros


@dataclass
class OnnxSummary:
    path: str
    file_bytes: int
    opset: int
    layers: list[OnnxLayer]


def format_onnx_summary(summary: OnnxSummary) -> str:
    """One row per quantized layer, then the file's size and opset (what `sgsc export --onnx` prints)."""
    rows = [f"{'layer':<28} {'shape':<18} {'groups':>6}  {'stored as (type:groups)':<30} {'dropped':>7}"]
    for layer in summary.layers:
        stored = " ".join(f"{name}:{count}" for name, count in layer.stored.items())
        rows.append(f"{printable(layer.name):<28} {'x'.join(map(str, layer.shape)):<18} {layer.groups:>6}  "
                    f"{stored:<30} "
                    f"{layer.dropped:>7}")
    rows.append(f"{summary.path}: {summary.file_bytes} bytes, ONNX opset {summary.opset}")
    return "\n".join(rows)


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
    replaced = list(attentions) + [name for name in by_name if name.rpartition(".")[0] not in attentions]
    # deepcopy with the replaced modules left out: their float weights are never needed again
    memo = {id(model.get_submodule(name)): nn.Identity() for name in replaced}
    twin = copy.deepcopy(model, memo).cpu().eval()
    described = []
    for name, attention in attentions.items():
        in_plan, out_plan = by_name[f"{name}.in_proj"], by_name[f"{name}.out_proj"]
        in_weight, out_weight = _rows_weight(in_plan, opset), _rows_weight(out_plan, opset)
        replace_submodule(twin, name, _IntegerMultiheadAttention(attention, in_weight, out_weight))
        described += [_describe(in_plan, in_weight), _describe(out_plan, out_weight)]
    for plan in plans:
        if plan.name.rpartition(".")[0] in attentions:
            continue
        module, description = _integer_module(plan, opset)
        replace_submodule(twin, plan.name, module)
        described.append(description)
    return twin, described


# ---- export --------------------------------------------------------------------------------------


def _dynamic_shapes(model: nn.Module, example: torch.Tensor):
    """Batch dimension dynamic; a char decoder's time dimension too, up to its block size."""
    from sgsc.nn.zoo import CharDecoder

    dims = {0: torch.export.Dim("batch")}
    if isinstance(model, CharDecoder):
        dims[1] = torch.export.Dim("time", max=model.config.block_size)
    return (dims,)


def _export_sample(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes a dimension whose example size is 1 to 1: trace a larger example so the
    # batch (and time) stay dynamic, and the file runs any size.
    from sgsc.nn.zoo import CharDecoder

    sample = example.detach().cpu()
    if sample.shape[0] == 1:
        sample = sample.expand(2, *sample.shape[1:])
    if isinstance(model, CharDecoder) and sample.dim() == 2 and sample.shape[1] == 1:
        sample = sample.expand(-1, 2)
    return sample.contiguous()


def zoo_example_input(name: str, config: dict) -> torch.Tensor:
    """A one-example input batch for zoo model ``name`` built from ``config`` (what `sgsc export --onnx` traces)."""
    from sgsc.nn.zoo import build_model

    with torch.device("meta"):
        built = build_model(name, config).config
    if name == "paper_cnn":
        return torch.zeros(1, built.in_channels, built.image_size, built.image_size)
    if name == "char_decoder":
        return torch.zeros(1, built.block_size, dtype=torch.int64)
    raise ValueError(f"no example input is known for model {name!r}; call export_onnx with one")


def _translate_dequantize(codes, scale, axis: int):
    from onnxscript import opset21 as op

    return op.DequantizeLinear(codes, scale, axis=axis)


def _retype_narrow_codes(proto, opset: int) -> None:
    """Retype the int8 codes of each ``DequantizeLinear`` that fit INT4 (or INT2) to that type, in place."""
    import ml_dtypes
    from onnx import numpy_helper

    narrow = {"INT2": ml_dtypes.int2, "INT4": ml_dtypes.int4}
    initializers = {init.name: init for init in proto.graph.initializer}
    retyped = set()
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers or node.input[0] in retyped:
            continue
        init = initializers[node.input[0]]
        values = numpy_helper.to_array(init)
        if values.dtype.name != "int8":
            continue
        width = int(codec.minimal_widths(torch.tensor([[int(values.min()), int(values.max())]])).max())
        onnx_type = onnx_integer_type(max(width, 1), opset)
        if onnx_type in narrow:
            init.CopyFrom(numpy_helper.from_array(values.astype(narrow[onnx_type]), init.name))
            retyped.add(init.name)


def strip_debug_info(proto) -> None:
    """Drop what the exporter records for debugging, in place: node names, each node's stack trace and
    module path (``metadata_props``, ``doc_string``), the exported program's signature and the
    intermediate shapes (``value_info``, which onnxruntime infers again). For the zoo models they
    are 2-5x the weights' bytes."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
    del proto.graph.value_info[:]
    del proto.graph.metadata_props[:]
    _shorten_intermediate_names(proto)


def _shorten_intermediate_names(proto) -> None:
    """Rename the values that flow between nodes to short ids, in place; graph inputs, outputs and
    initializers keep their names. The exporter's names (module paths and op names) were about a
    tenth of a small model's file."""
    keep = {v.name for v in (*proto.graph.input, *proto.graph.output)} | {i.name for i in proto.graph.initializer}
    renamed: dict[str, str] = {}
    for node in proto.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name and name not in keep:
                    names[i] = renamed.setdefault(name, f"t{len(renamed):x}")


def _narrow_gather_indices(proto) -> None:
    """Store the group orders of the width classes as int32, in place: the exporter widens ``index_select``'s
    indices to int64, twice the bytes, and ``Gather`` takes either."""
    from onnx import numpy_helper

    consumers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(f"{node.op_type}:{i}")
    for init in proto.graph.initializer:
        if init.data_type == onnx_tensor_type("INT64") and consumers.get(init.name) == {"Gather:1"}:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("int32"), init.name))


def onnx_tensor_type(name: str) -> int:
    from onnx import TensorProto

    return getattr(TensorProto, name)


def _minimal_opset(plans: list[_LayerPlan]) -> int:
    return INT2_OPSET if any(bool(((plan.widths > 0) & (plan.widths <= 2)).any()) for plan in plans) else INT4_OPSET


def export_onnx(
    source: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    example_inputs: torch.Tensor,
    *,
    opset: int | None = None,
    model: nn.Module | None = None,
) -> OnnxSummary:
    """Write ``source`` as an ONNX file at ``path`` (atomically) whose quantized weights are integers.

    ``source`` is a model with ``QLinear``/``QConv2d`` layers (codes from
    :func:`~sgsc.export.integer_codes`), or the path of a packed file (the codes and scales it
    stores). A packed file of a model outside the zoo (format version 4) needs ``model``: the
    float architecture it was saved from, as :func:`~sgsc.export.load_packed` takes it (copied, left
    untouched). ``example_inputs`` is one input batch (a tensor) to trace with. The file's batch dimension is
    dynamic (a char decoder's time dimension too, up to its block size); its input is named
    ``input``, its output ``output``. onnxruntime computes, in float32, what the model computes in
    eval mode (and :func:`~sgsc.export.load_packed` gives), up to the rounding of its own summation
    order; see the README for its session option that quantizes activations.

    ``opset`` defaults to the lowest that holds the codes: 21 (INT4), or 25 when a layer fits INT2;
    at an explicit ``opset`` below 25 such layers are stored as INT4. Returns what was written, per layer.
    """
    if not isinstance(source, (nn.Module, str, os.PathLike)):
        raise TypeError(f"source must be an nn.Module or a packed file's path, got {type(source).__name__}")
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError(f"example_inputs must be a tensor, got {type(example_inputs).__name__}")
    if example_inputs.dim() == 0:
        raise ValueError("example_inputs must have a batch dimension, got a 0-d tensor")
    onnx = require("onnx", "onnx")
    require("onnxscript", "onnx")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    if isinstance(source, nn.Module):
        if model is not None:
            raise ValueError("model= is for a packed file's path; a model in memory is exported as it is")
        quantized, plans = source, _plan(source)
    else:
        quantized, plans = _from_packed(Path(source), model)
    needed = _minimal_opset(plans)
    if opset is None:
        opset = needed
    elif isinstance(opset, bool) or not isinstance(opset, int) or opset < INT4_OPSET:
        raise ValueError(f"opset must be an int >= {INT4_OPSET} (INT4 needs it), got {opset!r}")
    twin, described = _integer_twin(quantized, plans, opset)
    translations = {torch.ops.sgsc_onnx.dequantize_linear.default: _translate_dequantize}
    try:
        program = torch.onnx.export(
            twin, (_export_sample(quantized, example_inputs),), dynamo=True, opset_version=opset,
            dynamic_shapes=_dynamic_shapes(quantized, example_inputs), input_names=["input"], output_names=["output"],
            custom_translation_table=translations, optimize=True, verbose=False,
        )
    except torch.onnx.OnnxExporterError as exc:  # torch.export's and the translator's failures, both wrapped
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"torch.onnx cannot express {type(quantized).__name__} in ONNX opset {opset}: {reason} "
            "(nothing was written)"
        ) from exc
    proto = program.model_proto
    _retype_narrow_codes(proto, opset)
    strip_debug_info(proto)
    _narrow_gather_indices(proto)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, proto.SerializeToString())
    return OnnxSummary(str(path), Path(path).stat().st_size, opset, described)


# ---- a packed file as the source -----------------------------------------------------------------


@torch.no_grad()
def _from_packed(path: Path, model: nn.Module | None = None) -> tuple[nn.Module, list[_LayerPlan]]:
    """``load_packed``'s model and, per quantized layer, the file's codes and scales.

    The loaded weights are ``float32(r) * scale`` per group (docs/FORMAT.md) and the file's ``scales``
    stream holds each stored layer's scales, so ``round(weight / scale)`` gives the codes back; they are
    checked to reproduce the loaded weights bit for bit. The quantized architecture on the meta device
    supplies each layer's grouping: the zoo model the header names, or ``model`` made into the
    file's record. A layer tied to an earlier one (a tied head) has that layer's codes and scales.
    """
    from safetensors import safe_open

    from sgsc.export import load_packed, read_header
    from sgsc.export.architecture import prepare_architecture, rebuild_on_meta
    from sgsc.export.format import SCALES, layer_slots
    from sgsc.export.record import parse

    header = read_header(path)
    if "model" in header:
        if model is not None:
            raise ValueError(f"{path}: the file names zoo model {header['model']!r}, which it rebuilds itself; "
                             "model= is for files of other architectures")
        loaded = load_packed(path)
        quantized = rebuild_on_meta(header["model"], header["config"])
        slots, tied = layer_slots(quantized), {}
    else:
        if model is None:
            raise ValueError(f"{path}: the file records an architecture of its own (no zoo model): pass "
                             "model=, the float architecture it was saved from, as load_packed takes it")
        loaded = load_packed(path, model=copy.deepcopy(model))  # checks the architecture against the file
        recorded = parse(path, header["architecture"])
        quantized = prepare_architecture(copy.deepcopy(model), recorded)
        slots, tied = recorded.slots(), recorded.tied
    slot_of = {slot.name: slot for slot in slots}
    with safe_open(str(path), framework="pt") as handle:
        all_scales = handle.get_tensor(SCALES)
    plans = []
    for name, layer in quantized_layers(quantized):
        weight_key = f"{name}.weight" if name else "weight"
        owner = tied.get(weight_key, weight_key).removesuffix("weight").removesuffix(".")
        plain = loaded.get_submodule(name)
        scales = all_scales[slot_of[owner].group_span()]
        grouped = layer.grouped(plain.weight.float())
        codes = torch.round(grouped / scales.unsqueeze(1)).to(torch.int64)
        if not torch.equal(codes.to(torch.float32) * scales.unsqueeze(1), grouped):
            raise ValueError(f"{path}: layer {name!r}: the loaded weights are not the file's codes times its scales")
        plans.append(_LayerPlan(name, layer, codes, scales, codec.minimal_widths(codes),
                                getattr(plain, "bias", None)))  # embeddings have none
    return loaded, plans
