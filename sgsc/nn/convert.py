"""``quantize_model``: swap a float model's layers for quantized ones, in place."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

from torch import nn

from sgsc.nn.conv_transpose import QConvTranspose1d, QConvTranspose2d
from sgsc.nn.layers import (
    QConv1d,
    QConv2d,
    QEmbedding,
    QLinear,
    QMultiheadAttention,
    _Quantized,
    check_init_bits,
    check_rounding,
    quantized_layers,
)
from sgsc.nn.recurrent import RECURRENT_SWAPS
from sgsc.nn.size import float_weights
from sgsc.ops.spec import WEIGHT_DTYPES

# Exact types quantize_model swaps (a subclass may change the forward, so it is left alone).
_SWAPS = {nn.Linear: QLinear, nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.Embedding: QEmbedding,
          nn.ConvTranspose1d: QConvTranspose1d, nn.ConvTranspose2d: QConvTranspose2d}

# Weight-bearing layers quantize_model leaves in float, with the reason it tells the user.
_UNSUPPORTED = (
    (nn.MultiheadAttention, "a subclass of nn.MultiheadAttention may change its forward"),
    (nn.modules.conv._ConvNd, "only nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d and nn.ConvTranspose2d are supported"),
    (nn.EmbeddingBag, "embedding bags are not quantized"),
    (nn.Embedding, "subclasses of nn.Embedding may change its forward; only exact nn.Embedding is swapped"),
    (nn.Bilinear, "not supported"),
    (nn.RNNBase, "only exact nn.LSTM (without proj_size) and nn.GRU are quantized"),
    (nn.Linear, "subclasses of nn.Linear may change its forward; only exact nn.Linear is swapped"),
)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is exactly Hugging Face transformers' ``Conv1D`` (GPT-2's projections): a linear
    layer that stores its weight as ``(in_features, out_features)``. Recognised by name, so sgsc never
    imports transformers."""
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__ == "transformers.pytorch_utils"


def _as_linear(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what a transformers ``Conv1D`` computes: its weight transposed to a new
    Parameter (one bit depth per output feature is then one per row, as for every linear layer; the
    packed runtime, the file and ONNX need nothing new), its bias taken over."""
    weight = conv1d.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], conv1d.bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
    linear.bias = conv1d.bias
    return linear.train(conv1d.training)


def _unsupported_reason(module: nn.Module) -> str | None:
    if is_transposed_linear(module):
        return None
    if isinstance(module, (_Quantized, QMultiheadAttention)) or type(module) in _SWAPS:
        if type(module) is nn.Embedding and module.max_norm is not None:
            return "max_norm renormalises the table in place on every lookup"
        if type(module) in (nn.ConvTranspose1d, nn.ConvTranspose2d) and module.groups != 1:
            return "a transposed convolution is quantized only with groups=1"
        return None
    if type(module) in RECURRENT_SWAPS and not getattr(module, "proj_size", 0):
        return None
    if type(module) is nn.MultiheadAttention:
        if not module._qkv_same_embed_dim or module.bias_k is not None:
            return "only kdim == vdim == embed_dim without bias_k/bias_v is supported"
        return None
    for kind, reason in _UNSUPPORTED:
        if isinstance(module, kind):
            return reason
    return None


def _swapped_whole(module: nn.Module) -> bool:
    return (type(module) in _SWAPS or type(module) in RECURRENT_SWAPS or type(module) is nn.MultiheadAttention
            or is_transposed_linear(module))


def _groups_for(name: str, groups: int | Mapping[str, int] | None) -> int | None:
    if groups is None or isinstance(groups, int):
        return groups
    return groups.get(name)


def _check_skip(model: nn.Module, skip: Iterable[str]) -> tuple[str, ...]:
    if isinstance(skip, str):
        raise TypeError("skip must be a collection of module names, not a single string")
    names = tuple(skip)
    known = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"skip names modules that do not exist in the model: {unknown}")
    return names


def _under(name: str, prefix: str) -> bool:
    """Whether module ``name`` lies strictly inside module ``prefix`` ("" is the model itself)."""
    return name != prefix and (prefix == "" or name.startswith(prefix + "."))


def _swap(module: nn.Module, name: str, init_bits: float, quant_groups: int | None, rounding: str) -> nn.Module:
    if is_transposed_linear(module):
        module = _as_linear(module)
    if type(module) in RECURRENT_SWAPS:  # per gate row, whatever ``groups`` says
        if module.weight_ih_l0.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"layer {name or '<model>'} has {module.weight_ih_l0.dtype} weights; sgsc quantizes "
                            f"{WEIGHT_DTYPES}")
        return RECURRENT_SWAPS[type(module)].from_float(module, init_bits=init_bits, rounding=rounding)
    weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"layer {name or '<model>'} has {weight.dtype} weights; sgsc quantizes {WEIGHT_DTYPES}")
    try:
        if isinstance(module, nn.MultiheadAttention):  # per head, whatever ``groups`` says
            return QMultiheadAttention.from_float(module, init_bits=init_bits, rounding=rounding)
        return _SWAPS[type(module)].from_float(module, quant_groups=quant_groups, init_bits=init_bits, rounding=rounding)
    except ValueError as exc:
        raise ValueError(f"layer {name or '<model>'}: {exc}") from exc


def _tie_quantizers(model: nn.Module) -> None:
    """Layers that share one weight (a tied embedding and head) share one quantizer, so it is quantized once.

    They must group it alike (the same shape, group count and grouping axis): two different groupings
    of one tensor would store it twice and train two bit depths for the same weights.
    """
    first: dict[int, tuple[str, nn.Module]] = {}
    for name, layer in quantized_layers(model):
        owner = first.setdefault(id(layer.weight), (name, layer))
        if owner[1] is layer:
            continue
        owner_name, owner_layer = owner
        layout = (tuple(layer.weight.shape), layer.quant_groups, layer.group_by)
        if layout != (tuple(owner_layer.weight.shape), owner_layer.quant_groups, owner_layer.group_by):
            raise ValueError(f"layers {owner_name!r} and {name!r} share a weight but group it differently; pass "
                             "`groups` so that both use the same number of groups")
        layer.bits, layer.exponent = owner_layer.bits, owner_layer.exponent


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` (a dotted path, as ``named_modules`` gives) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def quantize_model(
    model: nn.Module,
    init_bits: float = 8,
    skip: Iterable[str] = (),
    groups: int | Mapping[str, int] | None = None,
    rounding: str = "nearest",
) -> nn.Module:
    """Swap ``model``'s layers in place for quantized ones: ``nn.Linear`` (and transformers' ``Conv1D``, as the
    linear layer it computes) -> QLinear, ``nn.Conv1d``/``nn.Conv2d`` -> QConv1d/QConv2d,
    ``nn.ConvTranspose1d``/``nn.ConvTranspose2d`` -> QConvTranspose1d/QConvTranspose2d, ``nn.Embedding`` ->
    QEmbedding, ``nn.MultiheadAttention`` -> QMultiheadAttention, ``nn.LSTM``/``nn.GRU`` -> QLSTM/QGRU (one bit
    depth per gate row).

    The new layers take over the old layers' Parameters (so an existing reference to ``layer.weight``
    stays valid) and start at ``init_bits`` with exponents fitted to the weights; layers that share a
    weight (a tied embedding and head) share one quantizer. ``skip`` names modules (as in
    ``named_modules``) to leave alone, with everything under them. ``groups`` is the number of
    quantization groups: ``None`` for one per output channel (per token for embeddings), an int for
    every layer, or a mapping from layer name to int (others per channel); attention is always
    grouped per head. Weight-bearing layers it cannot quantize (other conv types, subclasses of the
    swapped types, nn.RNN, ...) and any other weight of two or more dimensions (a module's own
    Parameter) are left in float with one ``UserWarning`` naming them,
    and :func:`sgsc.model_bits_report` lists them; layers that are already quantized are left as they
    are. Returns ``model``, converted in place. A bare layer cannot replace itself in place: it is
    refused, naming the ``from_float`` constructor that makes its quantized copy.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    init_bits = check_init_bits(init_bits)
    check_rounding(rounding)
    if groups is not None and not isinstance(groups, (int, Mapping)):
        raise TypeError(f"groups must be None, an int or a mapping of layer names to ints, got {type(groups).__name__}")
    skip = _check_skip(model, skip)

    swapped: dict[int, nn.Module] = {}
    left_alone: list[str] = []
    whole_modules: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if any(name == s or _under(name, s) for s in skip) or any(_under(name, p) for p in whole_modules):
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            whole_modules.append(name)
            left_alone.append(f"{name or '<model>'} ({type(module).__name__}: {reason})")
            continue
        if not _swapped_whole(module):
            continue
        if type(module) is nn.MultiheadAttention:
            whole_modules.append(name)  # its projections are taken over whole, not swapped one by one
        if id(module) not in swapped:  # a module reused at several names becomes one QLayer
            swapped[id(module)] = _swap(module, name, init_bits, _groups_for(name, groups), rounding)
        if name == "":
            raise TypeError(f"quantize_model converts a model's layers in place, and a bare {type(model).__name__} "
                            f"cannot replace itself; quantize a model that holds it, or take the quantized copy "
                            f"that {type(swapped[id(module)]).__name__}.from_float(layer) makes")
        replace_submodule(model, name, swapped[id(module)])

    _tie_quantizers(model)
    left_alone += _other_float_weights(model, [*skip, *whole_modules])
    if left_alone:
        warnings.warn("sgsc.quantize_model left these layers in float: " + "; ".join(left_alone), stacklevel=2)
    return model


def _other_float_weights(model: nn.Module, named: list[str]) -> list[str]:
    """Weights of two or more dimensions left float outside the modules already named (skipped, or left
    with a reason): a custom module's own Parameter (a position table, a class token) or a layer sgsc does not
    know, which would otherwise stay float with nothing said."""
    return [f"{entry['name']} (a float Parameter of shape {tuple(entry['shape'])})" for entry in float_weights(model)
            if not any(entry["name"].startswith(prefix + ".") or prefix == "" for prefix in named)]
