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

The parts: :mod:`~sgsc.export.onnx_op` the op, its translation and the integer types;
:mod:`~sgsc.export.onnx_twin` the twin the exporter traces (and the layouts of its codes);
:mod:`~sgsc.export.onnx_proto` the surgery on the exported ModelProto; this module the export
itself, from a model or from a packed file (:func:`_from_packed`).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sgsc._deps import require
from sgsc._io import atomic_write
from sgsc.export import codec
from sgsc.export.format import printable
from sgsc.export.onnx_op import INT2_OPSET, INT4_OPSET, _translate_dequantize, dequantize_linear, onnx_integer_type
from sgsc.export.onnx_proto import _narrow_gather_indices, _retype_narrow_codes, onnx_tensor_type, strip_debug_info
from sgsc.export.onnx_twin import OnnxLayer, _integer_twin, _LayerPlan, _plan
from sgsc.nn import quantized_layers

__all__ = [
    "INT2_OPSET",
    "INT4_OPSET",
    "OnnxLayer",
    "OnnxSummary",
    "dequantize_linear",
    "export_onnx",
    "format_onnx_summary",
    "onnx_integer_type",
    "onnx_tensor_type",
    "strip_debug_info",
    "zoo_example_input",
]


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
    _check_batch_axis(proto, example_inputs.shape[0])
    _retype_narrow_codes(proto, opset)
    strip_debug_info(proto)
    _narrow_gather_indices(proto)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, proto.SerializeToString())
    _warn_fused_widths(plans, described)
    return OnnxSummary(str(path), Path(path).stat().st_size, opset, described)


# onnxruntime's one session option under which every width computes within the README's 1e-5
EXACT_SESSION_OPTION = ("session.disable_quant_qdq", "1")
# the integer types whose DequantizeLinear onnxruntime's default session fuses with a MatMul into MatMulNBits
FUSED_TYPES = ("INT2", "INT4", "INT8")


def _warn_fused_widths(plans: list[_LayerPlan], described: list[OnnxLayer]) -> None:
    """Warn, naming the layers and the option, where onnxruntime's default session would not compute what the
    model computes. It fuses a ``DequantizeLinear`` of INT2/INT4/INT8 codes that feeds a ``MatMul`` directly
    (a linear layer stored as one integer type, no pruned group) into ``MatMulNBits``, which rounds the
    activations to int8 (relative errors 1e-3 to 1e-2; measured on onnxruntime 1.32) and at INT2 returns
    wrong outputs; ``session.disable_quant_qdq=1`` keeps the float ``MatMul``. Layers stored in several types
    (concatenated), with pruned groups (padded), in INT16/INT32, convolutions and embeddings are not fused."""
    linear = {plan.name for plan in plans if isinstance(plan.layer, nn.Linear)}
    fused = [layer.name or "<model>" for layer in described
             if layer.name in linear and len(layer.stored) == 1 and set(layer.stored) <= set(FUSED_TYPES)
             and not layer.dropped]
    if fused:
        key, value = EXACT_SESSION_OPTION
        warnings.warn(
            f"linear layers {', '.join(fused[:5])}{' ...' if len(fused) > 5 else ''} are stored as one type of 8 bits "
            "or fewer, which onnxruntime's default session fuses into MatMulNBits (int8 activations, relative errors "
            f"up to 1e-2; wrong outputs at 2 bits): for the model's outputs within 1e-5, create the session with "
            f"options.add_session_config_entry({key!r}, {value!r})", stacklevel=3)


def _check_batch_axis(proto, example_batch: int) -> None:
    """The file's batch axis must be dynamic: a model whose forward fixed it (a shape read as a Python int)
    gives a file that runs one batch size. Fixed at the example's size, that is warned about; fixed at another
    (the larger sample traced for a batch-1 example), the file could not even run the example, and is refused."""
    axis = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if axis.dim_param:
        return
    if axis.dim_value != example_batch:
        raise ValueError(f"the exported graph fixes the batch axis at {axis.dim_value}, not the example's "
                         f"{example_batch}: the model's forward fixes its batch size; pass example_inputs with "
                         "at least 2 examples, of the batch size to run (nothing was written)")
    warnings.warn(f"the exported graph's batch axis is not dynamic: the model's forward fixes it, and the ONNX file "
                  f"runs only batches of {axis.dim_value}", stacklevel=3)


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
