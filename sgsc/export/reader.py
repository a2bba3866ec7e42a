"""Loading a packed file: :func:`load_packed` rebuilds the model on the float or the packed runtime from
what :mod:`sgsc.export.packed_file` has read and checked; :func:`read_header` reads the header alone."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from torch import nn

from sgsc.export import codec, record
from sgsc.export.architecture import SkipInitOnMeta, prepare_architecture
from sgsc.export.format import PackedFileError, dtype_name, quoted, quoted_names
from sgsc.export.packed_file import (
    PackedFile,
    _open,
    _plain_entries,
    _read_head,
    check_layer_values,
    checked_codes,
    packed_layers,
    read_packed,
)
from sgsc.nn import QConv1d, QConv2d, QEmbedding, QLinear, quantized_layers, replace_submodule
from sgsc.nn.conv_transpose import QConvTranspose1d, QConvTranspose2d

__all__ = [
    "RUNTIMES",
    "PackedFile",
    "check_layer_values",
    "float_layer",
    "load_packed",
    "packed_layers",
    "read_header",
    "read_packed",
]


def _assign_state(model: nn.Module, state) -> None:
    """Put each entry in its module, as ``load_state_dict(assign=True)`` would, in time linear in the entries.

    ``load_state_dict`` filters the whole state dict once per module: quadratic, minutes for a few
    thousand layers.
    """
    modules = dict(model.named_modules())
    for key, value in state:
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        current = getattr(module, name)
        setattr(module, name, nn.Parameter(value, requires_grad=current.requires_grad)
                if isinstance(current, nn.Parameter) else value)


def _plain_twin(layer: nn.Module) -> nn.Module:
    """The plain nn layer with ``layer``'s hyper-parameters, on the meta device."""
    with SkipInitOnMeta():  # its weight is replaced: no initialising on meta (an embedding's imports torch._dynamo)
        return _new_plain_twin(layer)


def _new_plain_twin(layer: nn.Module) -> nn.Module:
    if isinstance(layer, (QConv1d, QConv2d)):
        conv = nn.Conv1d if isinstance(layer, QConv1d) else nn.Conv2d
        return conv(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    if isinstance(layer, (QConvTranspose1d, QConvTranspose2d)):
        conv = nn.ConvTranspose1d if isinstance(layer, QConvTranspose1d) else nn.ConvTranspose2d
        return conv(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                    layer.output_padding, layer.groups, layer.bias is not None, layer.dilation, layer.padding_mode,
                    device="meta")
    if isinstance(layer, QEmbedding):
        return nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx,
                            scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse, device="meta")
    return nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")


def float_layer(layer: QLinear | QConv1d | QConv2d | QEmbedding, weight: torch.Tensor) -> nn.Module:
    """A plain nn layer with ``layer``'s hyper-parameters and bias, holding ``weight`` (frozen)."""
    plain = _plain_twin(layer)
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if getattr(layer, "bias", None) is not None:
        plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return plain


def _loaded_float_layer(layer: nn.Module, weight: nn.Parameter) -> nn.Module:
    """:func:`float_layer` for a model being loaded: the Parameters are taken over, not copied, so tied
    weights (and a bias shared with another layer) stay one Parameter."""
    plain = _plain_twin(layer)
    plain.weight = weight
    if getattr(layer, "bias", None) is not None:
        plain.bias = layer.bias.requires_grad_(False)
    return plain


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module of ``model`` has (a module may be registered at several), by its id: built once,
    as a walk of the whole model per layer would make loading quadratic in the number of layers."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _tie_plain_state(model: nn.Module, recorded: record.Record) -> None:
    """Each tied plain entry made the same tensor as the entry it is tied to, as in the saved model."""
    quantized = {layer.key(part) for layer in recorded.layers for part in record.QUANTIZER_PARTS}
    modules = dict(model.named_modules(remove_duplicate=False))
    for key, owner in recorded.tied.items():
        if key not in quantized:
            module, _, name = key.rpartition(".")
            owner_module, _, owner_name = owner.rpartition(".")
            setattr(modules[module], name, getattr(modules[owner_module], owner_name))


RUNTIMES = ("float", "packed")


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu", *, runtime: str = "float",
                max_bytes: int | None = None, model: nn.Module | None = None, activations: str = "float") -> nn.Module:
    """Rebuild a runnable model from a packed file, in eval mode, on ``device``.

    A zoo model's file names its architecture. Any other file records it by shapes and needs
    ``model``: the float architecture the saved model was made from, as built before
    ``quantize_model`` and any physical pruning. It is changed in place and returned: quantized as
    the file records (group counts, grouping, rounding), cut to the file's pruned shapes, and filled
    with the file's tensors; an architecture that does not match raises
    :class:`~sgsc.export.record.ArchitectureMismatch` (a ``ValueError``) naming the first mismatch.

    ``runtime="float"``: quantized layers come back as plain ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``/
    ``nn.Embedding`` layers holding the exact dequantized weights (layers that shared a weight share
    it again), so in eval mode the outputs equal those of the exported model bit for bit on the same
    device, and inference runs without the quantizer. ``runtime="packed"``: QLinear/QConv2d/QEmbedding
    layers come back as :class:`~sgsc.nn.packed.PackedLinear` (``PackedStreamLinear`` when small),
    ``PackedConv2d`` and ``PackedEmbedding`` holding the integer codes bit-packed at each group's width
    (memory about the file's size),
    computing from them; outputs match the float runtime's within the fp32 bound of
    :mod:`sgsc.ops.packed` (embeddings: bit for bit). A QMultiheadAttention's projections and a
    QLSTM/QGRU's matrices run packed too: those modules read each packed child's ``weight``, dequantized
    from its codes on every call. QConv1d layers, transposed convolutions and layers sharing a weight
    with one stay on the float runtime. A model exported in another dtype than float32 runs
    only on the float runtime. ``activations="int8"`` (packed runtime only) makes each ``PackedLinear``
    quantize its input per block (:func:`sgsc.ops.packed.int8_error_bound` bounds the difference).

    Every value is checked first (docs/FORMAT.md, "Validation a reader performs"): a file that fails
    raises :class:`PackedFileError`. So does one whose model would need more than ``max_bytes`` of
    memory; the default is 64 MiB plus 256 times the file's size, as a pruned group stores no bytes
    however large the weights it stands for.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if activations not in ("float", "int8") or (activations != "float" and runtime != "packed"):
        raise ValueError(f"activations must be 'float', or 'int8' with runtime='packed', got {activations!r} "
                         f"with runtime={runtime!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the float architecture) or None, got {type(model).__name__}")
    path = Path(path)
    device = torch.device(device)
    packed_file = read_packed(path, max_bytes)  # every check on the file before the architecture is touched
    # the architecture holds no storage: assigning the file's tensors is the only write
    model = _architecture(path, packed_file, model)
    _assign_state(model, ((key, value.clone()) for key, value in _plain_entries(packed_file)))
    if packed_file.record is not None:
        _tie_plain_state(model, packed_file.record)
    layers = dict(quantized_layers(model))
    packable = set()
    if runtime == "packed":
        from sgsc.nn.packed import packable_layers  # the packed runtime's kernels load only when asked for

        packable = set(packable_layers(model))
    names = _names_by_module(model)
    for name, new in _runtime_layers(path, packed_file, layers, runtime, device, packable):
        if hasattr(new, "activations"):  # a PackedLinear
            new.activations = activations
        for place in names[id(layers[name])]:
            replace_submodule(model, place, new)
    left_on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left_on_meta:  # an architecture with state the file does not hold; never silently garbage
        raise PackedFileError(f"{path}: the model has tensors the file does not hold: {quoted_names(left_on_meta)}")
    return model.to(device).eval()


def _architecture(path: Path, packed_file: PackedFile, model: nn.Module | None) -> nn.Module:
    """The meta-device architecture to fill: the zoo's rebuild, or ``model`` made into the file's record."""
    if packed_file.record is None:
        if model is not None:
            raise ValueError(f"{path}: the file names zoo model {quoted(packed_file.header['model'])}, which it "
                             "rebuilds itself; model= is for files of other architectures")
        return packed_file.architecture
    if model is None:
        raise ValueError(f"{path}: the file records an architecture of its own (no zoo model): pass model=, the "
                         "float architecture it was saved from, as built before quantize_model and pruning")
    try:
        return prepare_architecture(model, packed_file.record)
    except record.ArchitectureMismatch as exc:
        raise record.ArchitectureMismatch(f"{path}: the architecture passed as model= does not match the file: "
                                          f"{exc}") from None


def _tied_layers(packed_file: PackedFile) -> dict[str, list[str]]:
    """Each stored layer's name -> the layers that share its weight (and codes)."""
    tied: dict[str, list[str]] = {slot.name: [] for slot in packed_file.slots}
    recorded = packed_file.record
    for layer in recorded.layers if recorded is not None else ():
        owner = recorded.tied.get(layer.key("weight"))
        if owner is not None:
            tied[owner.removesuffix("weight").removesuffix(".")].append(layer.name)
    return tied


def _on_packed_runtime(path: Path, packed_file: PackedFile, tied: dict[str, list[str]],
                       packable: set[str]) -> list[bool]:
    """Whether each stored layer runs packed: it and every layer sharing its codes are packable, and float32.

    A packable layer of another dtype is refused before any layer is decoded: the packed runtime computes in
    float32, and casting would compute another model than the file's.
    """
    on_packed = [packable.issuperset([slot.name, *tied[slot.name]]) for slot in packed_file.slots]
    for slot, dtype, packed in zip(packed_file.slots, packed_file.weight_dtypes, on_packed):
        if packed and dtype != torch.float32:
            raise ValueError(f"{path}: layer {quoted(slot.name)}: its weight is {dtype_name(dtype)}; the packed "
                             "runtime computes in float32 only: load the file with runtime='float'")
    return on_packed


def _runtime_layers(path: Path, packed_file: PackedFile, layers: dict, runtime: str, device: torch.device,
                    packable: set[str]):
    """``(name, replacement)`` of every quantized layer, decoded one stored layer at a time.

    Layers sharing a weight get float layers sharing one Parameter, or packed layers of the same codes.
    """
    tied = _tied_layers(packed_file)
    on_packed = (_on_packed_runtime(path, packed_file, tied, packable) if runtime == "packed"
                 else [False] * len(packed_file.slots))
    decode_on = torch.device("cpu") if runtime == "packed" else device  # packed layouts are built on the CPU
    for (slot, packed, widths, scales), dtype, packs in zip(packed_layers(packed_file), packed_file.weight_dtypes,
                                                           on_packed):
        names = [slot.name, *tied[slot.name]]
        codes = checked_codes(path, slot, packed, widths, scales, dtype, decode_on)
        if packs:
            from sgsc.nn.packed import packed_module  # the packed runtime's kernels load only when asked for

            for name in names:
                yield name, packed_module(layers[name], codes, scales)
        else:
            weight = nn.Parameter(layers[slot.name].ungrouped(codec.dequantize(codes, scales, dtype)), requires_grad=False)
            for name in names:
                yield name, _loaded_float_layer(layers[name], weight)


def read_header(path: str | os.PathLike) -> dict:
    """The checked sgsc header of a packed file, read without its weights.

    Only the header and its checksum are read and checked (a version 4 file's record included);
    :func:`load_packed` and :func:`summarize` check every tensor.
    """
    path = Path(path)
    with _open(path) as handle:
        file_bytes = handle.seek(0, os.SEEK_END)
        handle.seek(0)
        header, _ = _read_head(path, handle, file_bytes)
    if "architecture" in header:
        record.parse(path, header["architecture"])
    return header
