"""Size accounting of quantized models: the differentiable size term, the payload report, the file estimate.

:func:`average_bits` is what training minimises; :func:`model_bits_report` counts the weight
payload at integer widths and :func:`estimated_file_bytes` adds what else a packed file stores.
Both are estimates (dense groups only, no header); the exact size of a packed file is what
:func:`sgsc.export.summarize` reads from the file itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sgsc.nn.layers import QuantizedLayer, quantized_layers


def _non_empty_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """Quantized layers with weights, each weight once: a tied weight is counted under its first layer."""
    seen: set[int] = set()
    layers = []
    for name, layer in quantized_layers(model):
        if layer.weight.numel() and id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            layers.append((name, layer))
    if not layers:
        raise ValueError("model has no quantized layers with weights; call sgsc.quantize_model first")
    return layers


def average_bits(model: nn.Module) -> torch.Tensor:
    """Bits per quantized weight, ``sum(relu(b_g) * n_g) / sum(n_g)``, differentiable in every ``b``.

    The size term of the training objective. ``n_g`` is the number of weights in group ``g``;
    exponents cost nothing here. Raises ``ValueError`` when the model has no quantized weights.
    """
    layers = _non_empty_layers(model)
    total_elements = sum(layer.weight.numel() for _, layer in layers)
    weighted = [torch.relu(layer.bits.float()).sum() * layer.elements_per_group for _, layer in layers]
    return torch.stack(weighted).sum() / total_elements


def storage_bits(bits: torch.Tensor) -> torch.Tensor:
    """The integer width that holds every code of a group: ``ceil(b)`` for ``b > 0``, else 0.

    With a fractional ``b`` the clamp range ``[-2^(b-1), 2^(b-1) - 1]`` rounds to codes that fit in
    ``ceil(b)`` two's-complement bits (and exactly ``b`` bits when ``b`` is whole).
    """
    return torch.ceil(torch.clamp(bits.detach().float(), min=0)).to(torch.int64)


def _layer_report(name: str, layer: QuantizedLayer) -> dict:
    bits = layer.bits.detach().float()
    widths = storage_bits(bits)
    per_group = layer.elements_per_group
    return {
        "name": name,
        "type": type(layer).__name__,
        "shape": list(layer.weight.shape),
        "quant_groups": layer.quant_groups,
        "weights": layer.weight.numel(),
        "mean_bits": float((bits.clamp(min=0) * per_group).sum() / max(layer.weight.numel(), 1)),
        "min_bits": float(bits.min()) if bits.numel() else 0.0,
        "max_bits": float(bits.max()) if bits.numel() else 0.0,
        "pruned_groups": int((bits <= 0).sum()),
        "storage_bits": int((widths * per_group).sum()),
    }


def model_bits_report(model: nn.Module) -> dict:
    """A JSON-serialisable summary: one row per quantized layer, and model totals.

    Per layer: shape, groups, mean/min/max learned bits, pruned groups and ``storage_bits`` (the
    weight payload at :func:`storage_bits` widths); a tied weight appears once. Totals: ``average_bits``
    (the continuous value the trainer optimises), ``storage_bits``, ``float32_bits`` of the same weights
    and their ratio. ``float_weights`` lists the weight matrices that stay in float (not quantized):
    ``(name, shape)`` of every parameter of two or more dimensions outside the quantized layers.
    """
    rows = [_layer_report(name, layer) for name, layer in _non_empty_layers(model)]
    total_weights = sum(row["weights"] for row in rows)
    payload = sum(row["storage_bits"] for row in rows)
    return {
        "layers": rows,
        "total_weights": total_weights,
        "average_bits": float(average_bits(model).detach()),
        "pruned_groups": sum(row["pruned_groups"] for row in rows),
        "storage_bits": payload,
        "float32_bits": 32 * total_weights,
        "compression_ratio": (32 * total_weights / payload) if payload else None,  # None: all pruned
        "float_weights": float_weights(model),
    }


def float_weights(model: nn.Module) -> list[dict]:
    """Parameters of two or more dimensions that no quantized layer holds: the weights that stay float."""
    quantized = {id(layer.weight) for _, layer in quantized_layers(model)}
    return [{"name": name, "shape": list(p.shape)} for name, p in model.named_parameters()
            if p.dim() >= 2 and id(p) not in quantized]


# docs/FORMAT.md: each group stores one width byte and one float32 scale
GROUP_METADATA_BYTES = 5


def estimated_file_bytes(model: nn.Module) -> dict:
    """An estimate of ``model``'s packed file: ``weight_bytes`` of codes, ``bytes`` in all.

    Codes at :func:`storage_bits` widths, stored dense (a file stores mostly-zero groups sparse,
    which only makes it smaller), plus :data:`GROUP_METADATA_BYTES` per group and every other
    state-dict tensor (biases, norms, embeddings, buffers) at its own dtype; the file's header and
    framing (about a kilobyte) are not counted.
    """
    layers = list(quantized_layers(model))
    quantized = {id(t) for _, layer in layers for t in (layer.weight, layer.bits, layer.exponent)}
    weight_bytes = math.ceil(model_bits_report(model)["storage_bits"] / 8)
    groups = sum(layer.quant_groups for _, layer in layers)
    others = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in quantized}
    plain = sum(t.numel() * t.element_size() for t in others.values())
    return {"weight_bytes": weight_bytes, "bytes": weight_bytes + GROUP_METADATA_BYTES * groups + plain}
