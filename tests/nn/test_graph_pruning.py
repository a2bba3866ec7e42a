"""Graph-based physical pruning (torch-pruning's dependency graph) on architectures the zoo lacks.

Each test zeroes chosen groups' bits by hand, builds its own reference (the masked model with the
removed channels silenced by the test, not by the library) and its own parameter arithmetic, prunes,
and compares.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torch_pruning")

import sgsc  # noqa: E402
from sgsc.nn import QCausalSelfAttention  # noqa: E402
from sgsc.nn.graph_pruning import prune_zero_bit_units  # noqa: E402
from sgsc.nn.zoo import PaperCNNConfig, build_model, model_name  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- models built from plain nn modules -----------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet-18's shape at small widths: stem, two basic blocks per stage, 1x1 downsampling shortcuts."""

    def __init__(self, widths=(8, 16, 32), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width)))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, expand: int, cout: int, stride: int, se: bool) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False),
                                       nn.BatchNorm2d(expand), nn.Hardswish())
        self.se = SqueezeExcite(expand, 4) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class MobileNetV3Small(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8, 16, 8, 1, se=True), InvertedResidual(8, 24, 12, 2, se=True),
                                    InvertedResidual(12, 24, 12, 1, se=False))
        self.last = nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Linear(32, 24), nn.Hardswish(), nn.Linear(24, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.last(self.blocks(self.stem(x))), 1), 1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, causal_attention: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.causal = causal_attention
        self.attn = (QCausalSelfAttention(width, heads, width // heads) if causal_attention
                     else nn.MultiheadAttention(width, heads, batch_first=True))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        h = self.ln1(x)
        if self.causal:
            x = x + self.attn(h)
        else:
            mask = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), 1)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=13, width=16, heads=4, hidden=24, layers=2, block=8, causal_attention=False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.Sequential(*(Block(width, heads, hidden, causal_attention) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


# ---- helpers --------------------------------------------------------------------------------


def _quantized(model: nn.Module) -> nn.Module:
    """Quantize, then give BN and biases non-trivial values, as after training, so a wrong fold shows."""
    torch.manual_seed(0)
    model = sgsc.quantize_model(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
            elif getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
                module.bias.uniform_(-0.3, 0.3)
    return model


def _zero_bits(layer, groups) -> None:
    with torch.no_grad():
        layer.bits[groups] = 0.0


@torch.no_grad()
def _silence(conv, channels, bn=None) -> None:
    """The test's own silencing: a zero-bit producer's bias and its BN's gamma/beta."""
    for param in (conv.bias, *((bn.weight, bn.bias) if bn is not None else ())):
        if param is not None:
            param[channels] = 0


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _adam(model: nn.Module, x) -> torch.optim.Adam:
    """An Adam with real state: one step on a loss of every output."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def _assert_same_outputs(pruned, reference, x) -> None:
    for train in (False, True):  # deep copies: a train-mode pass moves BN's running statistics
        a, b = copy.deepcopy(pruned).train(train), copy.deepcopy(reference).train(train)
        with torch.no_grad():
            torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def _images(n=4, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---- ResNet ---------------------------------------------------------------------------------


def test_resnet_internal_channels_go_with_bn_and_next_conv_and_adam_state_follows():
    model = _quantized(ResNet())
    x = _images()
    block = model.stages[1][0]  # 8 -> 16, stride 2
    _zero_bits(block.conv1, [2, 5, 11])
    reference = copy.deepcopy(model)
    _silence(reference.stages[1][0].conv1, [2, 5, 11], reference.stages[1][0].bn1)
    optimizer = _adam(model, x)
    old_w, old_bits, old_w2 = block.conv1.weight, block.conv1.bits, block.conv2.weight
    old_state = {name: {k: v.clone() for k, v in optimizer.state[p].items()}
                 for name, p in (("w", old_w), ("bits", old_bits), ("w2", old_w2))}
    before = _n_params(model)
    # the Adam step moved the weights: the reference must see the same weights
    reference.load_state_dict(model.state_dict())
    _silence(reference.stages[1][0].conv1, [2, 5, 11], reference.stages[1][0].bn1)

    report = prune_zero_bit_units(model, x, optimizer)

    # 3 rows of conv1 (8 in x 3x3) + their bits and exponents, 3 BN gammas and betas, 3 columns of conv2 (16 x 3x3)
    assert before - _n_params(model) == 3 * (8 * 9 + 2) + 3 * 2 + 3 * 16 * 9 == report.parameters_removed
    assert (block.conv1.out_channels, block.bn1.num_features, block.conv2.in_channels) == (13, 13, 13)
    _assert_same_outputs(model, reference, x)
    keep = torch.tensor([c for c in range(16) if c not in (2, 5, 11)])
    for name, new, dim in (("w", block.conv1.weight, 0), ("bits", block.conv1.bits, 0), ("w2", block.conv2.weight, 1)):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[new][key], old_state[name][key].index_select(dim, keep))
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(block.conv1.weight) in params and id(old_w) not in params
    assert {c.layer for c in report.changes} == {"stages.1.0.conv1", "stages.1.0.bn1", "stages.1.0.conv2"}


def test_the_rows_of_a_head_that_ends_the_model_stay_and_only_limits_the_groups():
    model = _quantized(ResNet())
    x = _images()
    _zero_bits(model.fc, [4])  # a logit: removing it would shift every class after it
    _zero_bits(model.stages[1][0].conv1, [2, 5])
    reference = copy.deepcopy(model)
    _silence(reference.stages[1][0].conv1, [5], reference.stages[1][0].bn1)

    report = prune_zero_bit_units(model, x, only={"stages.1.0.conv1": [5], "fc": [4]})

    assert [(k.layer, k.indices, k.reason) for k in report.kept] == [("fc", [4], "feeds the model output")]
    assert model.fc.out_features == 10 and model.stages[1][0].conv1.out_channels == 15  # group 2: not listed
    assert [(c.layer, c.groups) for c in report.changes if c.groups] == [("stages.1.0.conv1", [5])]
    _assert_same_outputs(model, reference, x)
    with pytest.raises(ValueError, match="only names 'nope', which is not a quantized layer"):
        prune_zero_bit_units(model, x, only={"nope": [0]})
    with pytest.raises(ValueError, match=r"only\['fc'\] holds group indices outside the layer's 10 groups"):
        prune_zero_bit_units(model, x, only={"fc": [10]})


def test_resnet_residual_channel_with_a_live_producer_is_kept_and_reported():
    model = _quantized(ResNet())
    # stage 0's residual stream: stem conv, stage0 block0 conv2, block1 conv2 (identity shortcuts)
    _zero_bits(model.stem[0], [3])
    _zero_bits(model.stages[0][0].conv2, [3])  # stages[0][1].conv2 channel 3 stays live
    before = copy.deepcopy(model)
    report = prune_zero_bit_units(model, _images())
    assert report.parameters_removed == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    reasons = {(k.layer, tuple(k.indices)): k.reason for k in report.kept}
    assert reasons[("stem.0", (3,))] == reasons[("stages.0.0.conv2", (3,))]
    assert "residual add" in reasons[("stem.0", (3,))] and "stages.0.1.conv2" in reasons[("stem.0", (3,))]


def test_resnet_residual_channel_goes_when_every_coupled_producer_is_zero_bit():
    model = _quantized(ResNet())
    x = _images()
    stage = model.stages[2]  # producers of its stream: the downsample conv and both blocks' conv2
    producers = [(stage[0].downsample[0], stage[0].downsample[1]), (stage[0].conv2, stage[0].bn2),
                 (stage[1].conv2, stage[1].bn2)]
    for conv, _ in producers:
        _zero_bits(conv, [0, 7])
    reference = copy.deepcopy(model)
    ref_stage = reference.stages[2]
    for conv, bn in ((ref_stage[0].downsample[0], ref_stage[0].downsample[1]), (ref_stage[0].conv2, ref_stage[0].bn2),
                     (ref_stage[1].conv2, ref_stage[1].bn2)):
        _silence(conv, [0, 7], bn)
    before = _n_params(model)
    report = prune_zero_bit_units(model, x)
    # rows: downsample (16 in x 1x1), conv2 twice (32 x 3x3), each +2 bits/exponent; 3 BNs x 2;
    # columns: stage2 block1 conv1 (32 x 3x3) and the head (10 rows)
    expected = 2 * ((16 + 2) + 2 * (32 * 9 + 2) + 3 * 2 + 32 * 9 + 10)
    assert before - _n_params(model) == expected
    assert model.fc.in_features == 30 and stage[1].conv1.in_channels == 30
    _assert_same_outputs(model, reference, x)
    assert not report.kept


def test_resnet_partly_zero_quantization_group_stays_whole():
    model = sgsc.quantize_model(ResNet(), groups={"stages.1.0.conv1": 4})  # 4 groups of 4 channels
    layer = model.stages[1][0].conv1
    _zero_bits(layer, [1])  # channels 4..7, all of whose channels can go
    report = prune_zero_bit_units(model, _images())
    assert layer.out_channels == 12 and layer.quant_groups == 3 and layer.bits.shape == (3,)
    assert report.kept == []


# ---- MobileNetV3 ----------------------------------------------------------------------------


def test_mobilenet_depthwise_squeeze_excite_and_gate_rules():
    model = _quantized(MobileNetV3Small())
    x = _images(size=32)
    block = model.blocks[0]
    _zero_bits(block.depthwise[0], [3, 9])  # its live expand channels feed only the masked depthwise channel
    _zero_bits(block.se.fc1, [1])           # relu(0) = 0: the squeeze unit goes
    _zero_bits(block.se.fc2, [5])           # hardsigmoid(0) = 0.5 gates a live channel: it stays
    reference = copy.deepcopy(model)
    rb = reference.blocks[0]
    _silence(rb.depthwise[0], [3, 9], rb.depthwise[1])
    _silence(rb.se.fc1, [1])
    before = _n_params(model)
    optimizer = _adam(model, x)
    reference.load_state_dict(model.state_dict())
    _silence(rb.depthwise[0], [3, 9], rb.depthwise[1])
    _silence(rb.se.fc1, [1])

    report = prune_zero_bit_units(model, x, optimizer)

    # per channel: expand row (8 in + bits, exponent) + BN 2, depthwise row (9 + 2) + BN 2, project column (8 out);
    # the squeeze convs shrink on both sides: a 1x1 conv with bias and per-row groups holds out*in + 3*out
    squeeze = lambda out, cin: out * cin + 3 * out  # noqa: E731
    per_channel = (8 + 2) + 2 + (9 + 2) + 2 + 8
    fc1, fc2 = squeeze(4, 16) - squeeze(3, 14), squeeze(16, 4) - squeeze(14, 3)
    assert before - _n_params(model) == 2 * per_channel + fc1 + fc2 == report.parameters_removed
    assert block.depthwise[0].groups == block.depthwise[0].out_channels == 14 == block.expand[0].out_channels
    assert block.se.fc1.out_channels == 3 and block.se.fc2.in_channels == 3
    _assert_same_outputs(model, reference, x)
    (kept,) = [k for k in report.kept if k.layer == "blocks.0.se.fc2"]
    assert kept.indices == [5] and "live channel of blocks.0.depthwise.0" in kept.reason  # which the SE also reads


# ---- transformer LM -------------------------------------------------------------------------


def _tokens(n=3, t=8):
    return torch.randint(0, 13, (n, t), generator=torch.Generator().manual_seed(2))


def test_transformer_mlp_units_go_with_their_constant_folded_residual_rows_and_mha_heads_stay():
    model = _quantized(TinyLM())
    idx = _tokens()
    mlp = model.blocks[0].mlp
    _zero_bits(mlp[0], [0, 5, 6])
    _zero_bits(mlp[2], [2])                          # a residual-stream row: LayerNorms read it
    _zero_bits(model.blocks[1].attn.in_proj, [9])    # head 1's v group (3 * 4 groups: q, k, v)
    reference = copy.deepcopy(model)
    before = _n_params(model)
    optimizer = _adam(model, idx)
    reference.load_state_dict(model.state_dict())  # the masked model: the units' GELU(bias) is folded, not silenced
    assert reference.blocks[0].mlp[0].bias[[0, 5, 6]].abs().min() > 0

    report = prune_zero_bit_units(model, idx, optimizer)

    assert before - _n_params(model) == 3 * (16 + 1 + 2) + 3 * 16
    assert (mlp[0].out_features, mlp[2].in_features) == (21, 21)
    _assert_same_outputs(model, reference, idx)
    kept = {k.layer: k for k in report.kept}
    assert "LayerNorm" in kept["blocks.0.mlp.2"].reason and kept["blocks.0.mlp.2"].indices == [2]
    assert kept["blocks.1.attn"].kind == "heads" and kept["blocks.1.attn"].indices == [1]


def test_causal_attention_heads_go_with_their_constant_folded():
    model = _quantized(TinyLM(causal_attention=True))
    idx = _tokens()
    attn = model.blocks[0].attn
    _zero_bits(attn.v_proj, [1, 3])
    reference = copy.deepcopy(model)
    before = _n_params(model)
    report = prune_zero_bit_units(model, idx)
    # q, k, v: 2 heads x 4 rows x (16 + bias) + 2 x (bits, exponent) each; out_proj: 8 columns x 16
    assert before - _n_params(model) == 3 * (2 * 4 * 17 + 2 * 2) + 8 * 16
    assert attn.n_heads == 2 and attn.q_proj.out_features == 8
    _assert_same_outputs(model, reference, idx)
    assert [c.removed for c in report.changes if c.layer == "blocks.0.attn"] == [{"heads": [1, 3]}]


def test_folding_a_unit_into_its_reader_moves_no_batchnorm_statistics():
    # the fold reads the unit's constant off a forward pass, which in train mode would update BN's statistics
    model = _quantized(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(4 * 36, 16), nn.GELU(), nn.Linear(16, 3))).train()
    _zero_bits(model[4], [1, 5])
    reference = copy.deepcopy(model)  # the masked model: the units' GELU(bias) is folded, not silenced
    assert model[4].bias[[1, 5]].abs().min() > 0
    report = prune_zero_bit_units(model, torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(4)))
    assert model[4].out_features == 14 and model[6].in_features == 14 and report.parameters_removed > 0
    assert model.training and int(model[1].num_batches_tracked) == int(reference[1].num_batches_tracked)
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    _assert_same_outputs(model, reference, torch.randn(3, 1, 6, 6))


# ---- the zoo agrees -------------------------------------------------------------------------


@pytest.mark.parametrize("head_groups", ["output", "channel"])
def test_paper_cnn_config_follows_the_cut_and_rebuilds_it(head_groups):
    config = dataclasses.asdict(PaperCNNConfig(image_size=8, channels=[6, 5], head_groups=head_groups))
    torch.manual_seed(0)
    model = _quantized(build_model("paper_cnn", config))
    _zero_bits(model.blocks[0][0], [1, 4])
    _zero_bits(model.blocks[1][0], [0, 2, 3])
    if head_groups == "channel":
        _zero_bits(model.head, [4])  # the head ignores last-block channel 4, whatever its conv bits
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    report = prune_zero_bit_units(model, x)
    removed = {c.layer: c.removed["output channels"] for c in report.changes if c.layer.endswith(".0")}
    last = [0, 2, 3, 4] if head_groups == "channel" else [0, 2, 3]
    assert removed == {"blocks.0.0": [1, 4], "blocks.1.0": last}
    assert model.config.channels == [4, 5 - len(last)]
    rebuilt = build_model(model_name(model), dataclasses.asdict(model.config))
    rebuilt.load_state_dict(model.state_dict())
    _assert_same_outputs(rebuilt, model, x)


def test_every_channel_zero_keeps_the_layers_last_one():
    config = dataclasses.asdict(PaperCNNConfig(image_size=8, channels=[4, 3]))
    model = build_model("paper_cnn", config)
    _zero_bits(model.blocks[0][0], [0, 1, 2, 3])
    report = prune_zero_bit_units(model, torch.randn(2, 1, 8, 8))
    assert model.blocks[0][0].out_channels == 1
    assert [(k.layer, k.indices) for k in report.kept] == [("blocks.0.0", [0])]
    assert "last channel" in report.kept[0].reason


# ---- errors ---------------------------------------------------------------------------------


class NumpyGate(nn.Module):
    """A custom layer that leaves torch for numpy: autograd, and so torch-pruning, cannot see through it."""

    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() * 0.5)


def test_untraceable_custom_layer_raises_and_leaves_the_model_as_it_was():
    model = _quantized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), NumpyGate(), nn.Conv2d(4, 2, 3)))
    _zero_bits(model[0], [1])
    model.train()
    model[3].weight.requires_grad_(False)
    optimizer = torch.optim.Adam(p for p in model.parameters() if p.requires_grad)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"cannot trace.*\['0', '1'\]"):
        prune_zero_bit_units(model, _images(), optimizer)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(m.training for m in model.modules()) and not model[3].weight.requires_grad
    assert model[0].out_channels == 4 and not optimizer.state


def test_arguments_are_checked_by_name():
    model = sgsc.quantize_model(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(TypeError, match="model"):
        prune_zero_bit_units("model", torch.randn(1, 3))
    with pytest.raises(TypeError, match="example_inputs"):
        prune_zero_bit_units(model, 3)
    with pytest.raises(TypeError, match="optimizer"):
        prune_zero_bit_units(model, torch.randn(1, 3), optimizer="adam")
    with pytest.raises(TypeError, match="silence"):
        prune_zero_bit_units(model, torch.randn(1, 3), silence=1)
    with pytest.raises(ValueError, match="example_inputs"):
        prune_zero_bit_units(model, torch.randn(1, 5))


def test_without_silencing_only_channels_whose_constants_are_zero_go():
    model = _quantized(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    _zero_bits(model[0], [1, 4])
    with torch.no_grad():
        model[0].bias[4] = 0.0  # unit 4 outputs exact zeros already; unit 1 outputs relu(bias) != 0
    reference = copy.deepcopy(model)
    report = prune_zero_bit_units(model, torch.randn(2, 6), silence=False)
    assert model[0].out_features == 7 and model[2].in_features == 7
    assert [(k.indices, "silence=False" in k.reason) for k in report.kept] == [([1], True)]
    _assert_same_outputs(model, reference, torch.randn(5, 6))
