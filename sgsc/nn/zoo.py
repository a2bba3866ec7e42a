"""Model zoo: the paper's CNN and a character-level decoder, each rebuilt from a JSON-able config.

Every model keeps its dataclass config in ``model.config``; ``dataclasses.asdict(model.config)``
plus :func:`model_name` is enough for :func:`build_model` to rebuild the architecture, which is how
an exporter stores it. Widths are explicit lists (channels per conv block, heads and MLP width per
decoder block) so that a physically pruned model is described exactly by its config.

Both models share the interface the rest of sgsc relies on: ``model(x)`` returns logits,
``model.embed(x)`` the penultimate-layer features (what ``model.head`` reads),
``model.forward_with_embedding(x)`` both from one pass, and
``model.attribution_layer`` the module whose output Grad-CAM / gradient x activation inspects.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from sgsc.nn.layers import QCausalSelfAttention, QConv2d, QLinear, check_rounding, quantized_layers

# ---- config validation ----------------------------------------------------------------------


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_int_list(name: str, value: object, low: int, length: int | None = None) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of ints, got {type(value).__name__}")
    for i, item in enumerate(value):
        _check_int(f"{name}[{i}]", item, low)
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have one entry per layer ({length}), got {len(value)}")
    return list(value)  # a list, so asdict -> JSON -> config round-trips to an equal config


# ---- PaperCNN -------------------------------------------------------------------------------

HEAD_GROUPS = ("output", "channel")


@dataclass
class PaperCNNConfig:
    """``len(channels)`` blocks of QConv2d 3x3 (padding 1) + BatchNorm2d + ReLU + MaxPool2d(2).

    ``channels`` lists every block's output channels explicitly (pruning shrinks them); the
    classifier reads ``channels[-1] * (image_size // 2**n)**2`` features. ``head_groups`` sets the
    classifier's bit-depth groups: ``"output"`` (the paper's: one per class row) or ``"channel"``
    (one per feature map of the last block, across every class). With ``"channel"`` a zero-bit head
    group makes its conv channel unused, so pruning removes the channel with it.
    """

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    channels: list[int] = field(default_factory=lambda: [32, 64])
    rounding: str = "nearest"
    head_groups: str = "output"

    def __post_init__(self) -> None:
        if self.head_groups not in HEAD_GROUPS:
            raise ValueError(f"head_groups must be one of {HEAD_GROUPS}, got {self.head_groups!r}")
        _check_int("in_channels", self.in_channels, 1)
        _check_int("image_size", self.image_size, 1)
        _check_int("num_classes", self.num_classes, 1)
        self.channels = _check_int_list("channels", self.channels, 1)
        if not self.channels:
            raise ValueError("channels must list at least one conv block")
        if self.feature_size < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.channels)} 2x2 poolings; "
                "use fewer channels entries or larger images"
            )
        check_rounding(self.rounding)

    @property
    def feature_size(self) -> int:
        """Side of the feature map the classifier flattens."""
        return self.image_size // 2 ** len(self.channels)


class PaperCNN(nn.Module):
    """The paper's CNN: quantized conv blocks, then a quantized linear classifier."""

    def __init__(self, config: PaperCNNConfig | None = None, *, init_bits: float = 8) -> None:
        super().__init__()
        self.config = config = config if config is not None else PaperCNNConfig()
        if not isinstance(config, PaperCNNConfig):
            raise TypeError(f"config must be a PaperCNNConfig, got {type(config).__name__}")
        blocks = []
        in_channels = config.in_channels
        for out_channels in config.channels:
            conv = QConv2d(in_channels, out_channels, 3, padding=1, init_bits=init_bits, rounding=config.rounding)
            blocks.append(nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(), nn.MaxPool2d(2)))
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        features = config.channels[-1] * config.feature_size**2
        by_channel = {"quant_groups": config.channels[-1], "group_by": "input"} if config.head_groups == "channel" else {}
        self.head = QLinear(features, config.num_classes, init_bits=init_bits, rounding=config.rounding, **by_channel)

    def sync_config(self) -> None:
        """Make ``config.channels`` the blocks' widths again after a physical pruning cut them, so
        :func:`build_model` rebuilds the pruned architecture."""
        self.config.channels = [block[0].out_channels for block in self.blocks]

    @property
    def attribution_layer(self) -> nn.Module:
        """The last conv block's ReLU: Grad-CAM's rectified feature maps, before pooling."""
        return self.blocks[-1][2]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, channels[-1] * feature_size**2)``, the classifier's input."""
        return torch.flatten(self.blocks(x), 1)

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, embed(x))`` from one pass, for callers that need both."""
        features = self.embed(x)
        return self.head(features), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


# ---- CharDecoder ----------------------------------------------------------------------------


@dataclass
class CharDecoderConfig:
    """A nanoGPT-like decoder. ``n_heads`` and ``mlp_hidden`` give each block's width explicitly.

    Left as ``None`` they default to ``n_embd // head_dim`` heads and ``4 * n_embd`` hidden units
    in every block. A block may have 0 heads or 0 hidden units (fully pruned): that branch then
    adds only its output bias.
    """

    vocab_size: int = 27
    block_size: int = 16
    n_embd: int = 64
    n_layer: int = 2
    head_dim: int = 16
    n_heads: list[int] | None = None
    mlp_hidden: list[int] | None = None
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        for name, low in (("vocab_size", 1), ("block_size", 1), ("n_embd", 1), ("n_layer", 1), ("head_dim", 1)):
            _check_int(name, getattr(self, name), low)
        if self.n_heads is None:
            if self.n_embd < self.head_dim:
                raise ValueError(f"head_dim {self.head_dim} exceeds n_embd {self.n_embd}; give n_heads explicitly")
            self.n_heads = [self.n_embd // self.head_dim] * self.n_layer
        if self.mlp_hidden is None:
            self.mlp_hidden = [4 * self.n_embd] * self.n_layer
        self.n_heads = _check_int_list("n_heads", self.n_heads, 0, self.n_layer)
        self.mlp_hidden = _check_int_list("mlp_hidden", self.mlp_hidden, 0, self.n_layer)
        check_rounding(self.rounding)


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_heads: int, head_dim: int, mlp_hidden: int, init_bits: float, rounding: str):
        super().__init__()
        quant = {"init_bits": init_bits, "rounding": rounding}
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = QCausalSelfAttention(n_embd, n_heads, head_dim, **quant)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(QLinear(n_embd, mlp_hidden, **quant), nn.GELU(), QLinear(mlp_hidden, n_embd, **quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharDecoder(nn.Module):
    """Character-level decoder: token + position embeddings, decoder blocks, LayerNorm, QLinear head.

    Embeddings and LayerNorms stay in float; every projection is quantized (attention per head).
    ``model(idx)`` maps ``(B, T)`` token ids, ``T <= block_size``, to ``(B, T, vocab_size)`` logits.
    """

    def __init__(self, config: CharDecoderConfig | None = None, *, init_bits: float = 8) -> None:
        super().__init__()
        self.config = config = config if config is not None else CharDecoderConfig()
        if not isinstance(config, CharDecoderConfig):
            raise TypeError(f"config must be a CharDecoderConfig, got {type(config).__name__}")
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(
            DecoderBlock(config.n_embd, heads, config.head_dim, hidden, init_bits, config.rounding)
            for heads, hidden in zip(config.n_heads, config.mlp_hidden)
        )
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = QLinear(config.n_embd, config.vocab_size, init_bits=init_bits, rounding=config.rounding)
        self._init_weights(init_bits)

    @torch.no_grad()
    def _init_weights(self, init_bits: float) -> None:
        # nanoGPT's init: N(0, 0.02), residual outputs shrunk by sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth; exponents are then re-fitted to these weights.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.config.n_layer))
        for _, layer in quantized_layers(self):
            layer.reset_quantizer(init_bits)

    def sync_config(self) -> None:
        """Make ``config.n_heads`` and ``config.mlp_hidden`` the blocks' widths again after a physical
        pruning cut them, so :func:`build_model` rebuilds the pruned architecture."""
        self.config.n_heads = [block.attn.n_heads for block in self.blocks]
        self.config.mlp_hidden = [block.mlp[0].out_features for block in self.blocks]

    @property
    def attribution_layer(self) -> nn.Module:
        """The token embedding: gradient x activation there scores each input character."""
        return self.token_embedding

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-LayerNorm features ``(B, T, n_embd)``, the head's input."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        time = idx.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size {self.config.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward_with_embedding(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, embed(idx))`` from one pass, for callers that need both."""
        features = self.embed(idx)
        return self.head(features), features

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx))


# ---- registry -------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[type[nn.Module], type]] = {}


def register_model(name: str, model_cls: type[nn.Module], config_cls: type) -> None:
    """Make ``model_cls(config_cls(**config))`` buildable as ``build_model(name, config)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls must be a dataclass, got {config_cls!r}")
    if name in _REGISTRY and _REGISTRY[name] != (model_cls, config_cls):
        raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name][0].__name__}")
    _REGISTRY[name] = (model_cls, config_cls)


register_model("paper_cnn", PaperCNN, PaperCNNConfig)
register_model("char_decoder", CharDecoder, CharDecoderConfig)


def available_models() -> list[str]:
    """Registered model names."""
    return sorted(_REGISTRY)


def build_model(name: str, config: Mapping | None = None, *, init_bits: float = 8) -> nn.Module:
    """Build registered model ``name`` from a config mapping (e.g. ``asdict(model.config)`` via JSON).

    Missing keys take the config's defaults; unknown keys are a ``ValueError`` (a typo would
    otherwise silently build a different architecture).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; available: {available_models()}")
    model_cls, config_cls = _REGISTRY[name]
    config = dict(config or {})
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"config has keys {unknown} that {config_cls.__name__} does not define ({sorted(known)})")
    return model_cls(config_cls(**config), init_bits=init_bits)


def model_name(model: nn.Module) -> str:
    """The registry name :func:`build_model` rebuilds ``model``'s architecture under."""
    for name, (model_cls, _) in _REGISTRY.items():
        if type(model) is model_cls:
            return name
    raise TypeError(f"{type(model).__name__} is not a registered sgsc model; see sgsc.nn.zoo.register_model")
