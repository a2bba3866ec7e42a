"""Physical pruning: remove the channels, heads and hidden units whose bits reached zero.

A quantized group with ``bits <= 0`` already contributes exact zeros to its layer's weight (the
*masked* model). Pruning removes it for real, so the model, its checkpoint and its steps shrink,
and the result computes exactly what the masked model computes:

* **PaperCNN conv channel** (a zero-bit group of block ``i``'s conv). The conv then outputs only
  its bias, and BatchNorm turns that constant into ``beta`` (train mode) or into a running-stat
  expression (eval mode), which ReLU passes on. The constant cannot be folded into the next conv:
  with zero padding its contribution differs at the image border. So pruning first *silences* the
  channel (:func:`silence_channels`: conv bias, BN ``gamma`` and ``beta`` set to 0, which
  makes the channel emit exact zeros in both modes) and then removes it: the conv's output
  channel, its BN entries and the matching input channel of the next conv or the head's input
  columns. The physically pruned model equals the silenced masked model. Dropping that constant
  is deliberate: it is a parameter the size term does not pay for, and a channel the optimiser
  has zeroed should not keep feeding the next layer through its shift. The change of function
  happens at pruning time; the trainer's next safety check sees it. One channel per block is
  always kept (``PaperCNNConfig`` needs at least one), masked but present.
* **PaperCNN head group** (``head_groups="channel"``: a zero-bit head group). The head multiplies
  that last-block channel's features by exact zeros, so the channel is removed with its head
  columns and group, whatever its conv bits; this changes nothing the model computes.
* **CharDecoder head** (a zero-bit ``v_proj`` group). Its values are the constant ``v_proj`` bias
  slice, attention averages them to that constant, and ``out_proj`` maps it to a constant vector,
  which is folded into ``out_proj.bias``; then the head's q/k/v rows and ``out_proj`` columns go.
  (Zero-bit q/k groups alone only flatten attention; they cost no bits but keep their head.)
* **CharDecoder MLP hidden unit** (a zero-bit group of ``mlp[0]``). The unit outputs the constant
  ``GELU(bias)``; its contribution through ``mlp[2]`` is folded into ``mlp[2].bias``.

Both decoder folds are exact up to float rounding. Zero-bit groups that feed the residual stream
or the logits (``out_proj``/``mlp[2]``/``head`` rows) cannot be removed and stay masked.

Every cut Parameter is replaced by a new, smaller one; given the optimiser, :func:`prune` swaps it
into the param groups and cuts its per-parameter state (Adam's moments) the same way. Anything
else holding the old Parameters (a ``DistributedDataParallel`` wrapper) must be rebuilt.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sgsc.nn import QCausalSelfAttention, QLinear, quantized_layers
from sgsc.nn.zoo import CharDecoder, PaperCNN

# Units to remove: "<module path>" -> sorted indices (channels of a conv block, heads of an
# attention module, hidden units of an MLP). Plain lists of ints, so rank 0 can broadcast them.
Units = dict[str, list[int]]


SUPPORTED = (PaperCNN, CharDecoder)


def supports(model: nn.Module) -> bool:
    """Whether this module can prune ``model`` (the zoo's architectures)."""
    return isinstance(model, SUPPORTED)


def _check_model(model: nn.Module) -> None:
    if not supports(model):
        raise TypeError(f"pruning supports PaperCNN and CharDecoder, got {type(model).__name__}")


def _dead_rows(layer: nn.Module, bits: torch.Tensor) -> torch.Tensor:
    """Bool mask over the layer's output rows: True where the row's group has ``bits <= 0``."""
    if bits.numel() == 0:
        return torch.zeros(layer.weight.shape[0], dtype=torch.bool)
    rows_per_group = layer.weight.shape[0] // bits.numel()
    return (bits.detach() <= 0).cpu().repeat_interleave(rows_per_group)


def dead_units(model: nn.Module, bits: Mapping[str, torch.Tensor] | None = None) -> Units:
    """Every unit of ``model`` whose bits reached zero and that :func:`prune` can remove.

    Keys are ``blocks.<i>`` (conv channels of a PaperCNN block), ``blocks.<i>.attn`` (heads) and
    ``blocks.<i>.mlp`` (hidden units) of a CharDecoder. A PaperCNN block never loses its last
    channel. ``bits`` maps layer names to bit tensors to judge instead of the layers' own (a
    snapshot taken earlier, of the same shapes).
    """
    _check_model(model)
    judge = lambda name, layer: _dead_rows(layer, layer.bits if bits is None else bits[name])  # noqa: E731
    units: Units = {}
    if isinstance(model, PaperCNN):
        for i, block in enumerate(model.blocks):
            dead_mask = judge(f"blocks.{i}.0", block[0])
            if i == len(model.blocks) - 1 and model.head.group_by == "input":
                head_bits = model.head.bits if bits is None else bits["head"]
                dead_mask = dead_mask | (head_bits.detach() <= 0).cpu()  # one head group per channel
            dead = dead_mask.nonzero().flatten().tolist()
            if len(dead) == block[0].out_channels:
                dead = dead[1:]  # keep one channel: a block cannot be empty
            if dead:
                units[f"blocks.{i}"] = dead
        return units
    for i, block in enumerate(model.blocks):
        v_proj = block.attn.v_proj
        v_bits = v_proj.bits if bits is None else bits[f"blocks.{i}.attn.v_proj"]
        heads = (v_bits.detach() <= 0).nonzero().flatten().tolist()
        hidden = judge(f"blocks.{i}.mlp.0", block.mlp[0]).nonzero().flatten().tolist()
        if heads:
            units[f"blocks.{i}.attn"] = heads
        if hidden:
            units[f"blocks.{i}.mlp"] = hidden
    return units


def common_units(a: Units, b: Units) -> Units:
    """Units present in both ``a`` and ``b`` (dead now and dead at an earlier check, say)."""
    both = {key: sorted(set(a[key]) & set(b.get(key, ()))) for key in a}
    return {key: value for key, value in both.items() if value}


# ---- tensor surgery -------------------------------------------------------------------------


# What every pruner shares (this one and sgsc.nn.graph_pruning): index arithmetic and slicing a Parameter
# with its optimiser state.


def keep_index(size: int, drop: list[int]) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


@torch.no_grad()
def shrink_parameter(module: nn.Module, name: str, dim: int, keep: torch.Tensor, optimizer) -> None:
    """Keep ``keep`` along ``dim`` of ``module.<name>`` and of its optimiser state.

    A Parameter is replaced by a new one (and swapped in the optimiser), not resized through
    ``.data``: autograd caches a Parameter's shape in its gradient accumulator, which a live graph
    or a DDP reducer may still hold.
    """
    old = getattr(module, name)
    if old is None:
        return
    data = old.detach().index_select(dim, keep.to(old.device)).contiguous()
    if not isinstance(old, nn.Parameter):
        setattr(module, name, data)  # a buffer
        return
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            key: value.index_select(dim, keep.to(value.device)).contiguous()
            if isinstance(value, torch.Tensor) and value.shape == old.shape
            else value
            for key, value in state.items()
        }


def _shrink_rows(layer: nn.Module, rows: torch.Tensor, optimizer) -> None:
    """Keep output rows ``rows`` of a quantized layer; its groups must be whole row runs."""
    groups = layer.bits.numel()
    rows_per_group = layer.weight.shape[0] // groups if groups else 1
    if rows_per_group > 1 and rows.numel() % rows_per_group:
        raise ValueError("pruning must remove whole quantization groups")
    group_index = rows[::rows_per_group] // rows_per_group
    shrink_parameter(layer, "weight", 0, rows, optimizer)
    shrink_parameter(layer, "bias", 0, rows, optimizer)
    shrink_parameter(layer, "bits", 0, group_index, optimizer)
    shrink_parameter(layer, "exponent", 0, group_index, optimizer)


def _shrink_columns(layer: QLinear | nn.Module, columns: torch.Tensor, optimizer) -> None:
    shrink_parameter(layer, "weight", 1, columns, optimizer)


def freeze_empty_layers(model: nn.Module) -> None:
    """Stop gradients to what a fully pruned head or MLP no longer uses.

    Zero-element Parameters and the quantizers of weightless layers never receive a gradient,
    and DistributedDataParallel would wait for one forever. Call it on a model rebuilt from a
    pruned config too, so it matches the model it was saved from.
    """
    for param in model.parameters():
        if param.numel() == 0:
            param.requires_grad_(False)
    for _, layer in quantized_layers(model):
        if layer.weight.numel() == 0:
            layer.bits.requires_grad_(False)
            layer.exponent.requires_grad_(False)


# ---- PaperCNN -------------------------------------------------------------------------------


@torch.no_grad()
def silence_channels(model: PaperCNN, units: Units) -> None:
    """Zero the conv bias and BN ``gamma``/``beta`` of the PaperCNN channels in ``units``.

    A zero-bit channel so silenced outputs exact zeros in train and eval mode: the masked model
    that :func:`prune` reproduces when it removes the channel.
    """
    if not isinstance(model, PaperCNN):
        raise TypeError(f"silence_channels needs a PaperCNN, got {type(model).__name__}")
    for key, channels in units.items():
        conv, bn = model.blocks[int(key.split(".")[1])][:2]
        index = torch.tensor(channels, dtype=torch.long, device=conv.weight.device)
        for param in (conv.bias, bn.weight, bn.bias):
            if param is not None:
                param[index] = 0


def _prune_cnn_block(model: PaperCNN, i: int, channels: list[int], optimizer) -> None:
    conv, bn = model.blocks[i][0], model.blocks[i][1]
    keep = keep_index(conv.out_channels, channels)
    _shrink_rows(conv, keep, optimizer)
    conv.out_channels = keep.numel()
    for name in ("weight", "bias", "running_mean", "running_var"):
        shrink_parameter(bn, name, 0, keep, optimizer)
    bn.num_features = keep.numel()
    if i + 1 < len(model.blocks):
        nxt = model.blocks[i + 1][0]
        _shrink_columns(nxt, keep, optimizer)
        nxt.in_channels = keep.numel()
    else:
        # the head reads the flattened (C, H, W) map: channel c owns columns [c*HW, (c+1)*HW)
        area = model.config.feature_size**2
        columns = (keep.unsqueeze(1) * area + torch.arange(area)).flatten()
        _shrink_columns(model.head, columns, optimizer)
        model.head.in_features = columns.numel()
        if model.head.group_by == "input":
            shrink_parameter(model.head, "bits", 0, keep, optimizer)
            shrink_parameter(model.head, "exponent", 0, keep, optimizer)
    model.config.channels[i] = keep.numel()


# ---- CharDecoder ----------------------------------------------------------------------------


@torch.no_grad()
def fold_into_bias(layer: QLinear, columns: torch.Tensor, constant: torch.Tensor) -> None:
    """Add ``q(W)[:, columns] @ constant`` to ``layer.bias``: what those inputs always contribute."""
    if not columns.numel() or not bool(constant.any()):
        return
    if layer.bias is None:
        raise ValueError("cannot fold a pruned unit's constant output into a layer without bias")
    weight = layer.quantized_weight().detach()[:, columns.to(layer.weight.device)]
    layer.bias += weight.to(layer.bias.dtype) @ constant.to(layer.bias.dtype)


def _prune_heads(attn: QCausalSelfAttention, heads: list[int], optimizer) -> None:
    hd = attn.head_dim
    drop_cols = torch.tensor([h * hd + j for h in heads for j in range(hd)], dtype=torch.long)
    v_bias = attn.v_proj.bias
    if v_bias is not None:
        fold_into_bias(attn.out_proj, drop_cols, v_bias.detach()[drop_cols.to(v_bias.device)])
    keep = keep_index(attn.n_heads * hd, drop_cols.tolist())
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        _shrink_rows(proj, keep, optimizer)
        proj.out_features = keep.numel()
    _shrink_columns(attn.out_proj, keep, optimizer)
    attn.out_proj.in_features = keep.numel()
    attn.n_heads -= len(heads)


def _prune_hidden(mlp: nn.Sequential, units: list[int], optimizer) -> None:
    up, act, down = mlp[0], mlp[1], mlp[2]
    drop = torch.tensor(units, dtype=torch.long)
    if up.bias is not None:
        fold_into_bias(down, drop, act(up.bias.detach()[drop.to(up.bias.device)]))
    keep = keep_index(up.out_features, units)
    _shrink_rows(up, keep, optimizer)
    up.out_features = keep.numel()
    _shrink_columns(down, keep, optimizer)
    down.in_features = keep.numel()


# ---- entry point ----------------------------------------------------------------------------


def _check_cnn_units(model: PaperCNN, units: Units) -> None:
    for key in units:
        path = key.split(".")
        if len(path) != 2 or path[0] != "blocks" or not path[1].isdigit() or int(path[1]) >= len(model.blocks):
            raise ValueError(f"units names {key!r}, which is not a prunable unit of PaperCNN")


def prune(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, units: Units | None = None) -> Units:
    """Physically remove ``units`` (default and at most :func:`dead_units`) from ``model``, in place.

    ``model.config`` is updated so ``build_model(model_name(model), asdict(model.config))``
    rebuilds the pruned architecture. ``optimizer``'s state for the touched Parameters is cut to
    match. Returns the units removed. See the module docstring for the exact semantics.
    """
    _check_model(model)
    units = dead_units(model) if units is None else {key: sorted(set(value)) for key, value in units.items() if value}
    if isinstance(model, PaperCNN):
        _check_cnn_units(model, units)
    dead = dead_units(model)
    live = {key: sorted(set(value) - set(dead.get(key, ()))) for key, value in units.items()}
    live = {key: value for key, value in live.items() if value}
    if live:
        raise ValueError(f"units {live} still have bits (or are a block's last channel); only dead units can be pruned")
    if isinstance(model, PaperCNN):
        silence_channels(model, units)
    for key, indices in units.items():
        path = key.split(".")
        if isinstance(model, PaperCNN) and len(path) == 2 and path[0] == "blocks":
            _prune_cnn_block(model, int(path[1]), indices, optimizer)
        elif isinstance(model, CharDecoder) and len(path) == 3 and path[2] == "attn":
            _prune_heads(model.blocks[int(path[1])].attn, indices, optimizer)
        elif isinstance(model, CharDecoder) and len(path) == 3 and path[2] == "mlp":
            _prune_hidden(model.blocks[int(path[1])].mlp, indices, optimizer)
        else:
            raise ValueError(f"units names {key!r}, which is not a prunable unit of {type(model).__name__}")
    if isinstance(model, CharDecoder):
        model.config.n_heads = [block.attn.n_heads for block in model.blocks]
        model.config.mlp_hidden = [block.mlp[0].out_features for block in model.blocks]
    freeze_empty_layers(model)
    return units
