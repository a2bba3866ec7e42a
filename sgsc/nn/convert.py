"""``quantize_model``: swap a float model's layers for quantized ones, in place."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

from torch import nn

from sgsc.nn.layers import QUANTIZED_TYPES, QConv2d, QLinear, check_init_bits, check_rounding
from sgsc.ops.spec import WEIGHT_DTYPES

# ---- quantize_model ------------------------------------------------------------------------

# Weight-bearing layers quantize_model leaves in float, with the reason it tells the user.
_UNSUPPORTED = (
    (nn.MultiheadAttention, "its forward reads the projection weights directly, bypassing submodules"),
    (nn.modules.conv._ConvNd, "only nn.Conv2d is supported"),
    (nn.Embedding, "embeddings are not quantized"),
    (nn.EmbeddingBag, "embeddings are not quantized"),
    (nn.Bilinear, "not supported"),
    (nn.RNNBase, "recurrent layers are not supported"),
    (nn.Linear, "subclasses of nn.Linear may change its forward; only exact nn.Linear is swapped"),
)


def _unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, QUANTIZED_TYPES) or type(module) in (nn.Linear, nn.Conv2d):
        return None
    for kind, reason in _UNSUPPORTED:
        if isinstance(module, kind):
            return reason
    return None


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
    if module.weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"layer {name or '<model>'} has {module.weight.dtype} weights; sgsc quantizes {WEIGHT_DTYPES}")
    try:
        cls = QLinear if isinstance(module, nn.Linear) else QConv2d
        return cls.from_float(module, quant_groups=quant_groups, init_bits=init_bits, rounding=rounding)
    except ValueError as exc:
        raise ValueError(f"layer {name or '<model>'}: {exc}") from exc


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
    """Swap every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` in place for QLinear / QConv2d.

    The new layers take over the old layers' Parameters (so tied weights stay tied and an existing
    reference to ``layer.weight`` stays valid) and start at ``init_bits`` with exponents fitted to
    the weights. ``skip`` names modules (as in ``named_modules``) to leave alone, with everything
    under them. ``groups`` is the number of quantization groups: ``None`` for one per output
    channel, an int for every layer, or a mapping from layer name to int (others per channel).
    Weight-bearing layers it cannot quantize (nn.MultiheadAttention, other conv types, embeddings,
    nn.Linear subclasses, ...) are left in float with one ``UserWarning`` naming them; layers that
    are already quantized are left as they are. Returns ``model``, or the new layer when ``model``
    itself is an ``nn.Linear``/``nn.Conv2d``.
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
    inside_unsupported: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if any(name == s or _under(name, s) for s in skip) or any(_under(name, p) for p in inside_unsupported):
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            inside_unsupported.append(name)
            left_alone.append(f"{name or '<model>'} ({type(module).__name__}: {reason})")
            continue
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        if id(module) not in swapped:  # a module reused at several names becomes one QLayer
            swapped[id(module)] = _swap(module, name, init_bits, _groups_for(name, groups), rounding)
        if name == "":
            return swapped[id(module)]
        replace_submodule(model, name, swapped[id(module)])

    if left_alone:
        warnings.warn("sgsc.quantize_model left these layers in float: " + "; ".join(left_alone), stacklevel=2)
    return model
