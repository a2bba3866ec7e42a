"""Physical pruning of the zoo's models, through the one pruner every model uses: the pruned model
computes what the masked model computes (with the conv channels' constants silenced), is smaller,
and its config rebuilds it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

pytest.importorskip("torch_pruning")

from sgsc.nn import average_bits, quantized_layers  # noqa: E402
from sgsc.nn.graph_pruning import prune_zero_bit_units  # noqa: E402
from sgsc.nn.zoo import CharDecoderConfig, PaperCNNConfig, build_model, model_name  # noqa: E402
from sgsc.train.pruners import common_units, zero_bit_groups  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def silence_channels(model, units) -> None:
    """The masked model pruning reproduces: zero-bit conv channels' bias and BN gamma/beta set to 0."""
    for key, channels in units.items():
        conv, bn = model.blocks[int(key.split(".")[1])][:2]
        for param in (conv.bias, bn.weight, bn.bias):
            if param is not None:
                param[channels] = 0


def prune(model, optimizer=None):
    """Prune the zoo model on inputs of its own kind; the units removed, as ``blocks.<i>`` -> channels
    for the CNN, ``blocks.<i>.attn`` -> heads and ``blocks.<i>.mlp`` -> hidden units for the decoder."""
    x = _images() if hasattr(model.config, "channels") else _tokens()
    report = prune_zero_bit_units(model, x, optimizer)
    units = {}
    for change in report.changes:
        if change.layer.endswith(".attn") and "heads" in change.removed:
            units[change.layer] = change.removed["heads"]
        elif change.layer.endswith(".mlp.0") or (change.layer.startswith("blocks.") and change.layer.endswith(".0")
                                                  and change.layer.count(".") == 2):
            units[change.layer.rsplit(".", 1)[0]] = change.removed["output channels"]
    return units


def _cnn(channels=(6, 5), head_groups="output") -> torch.nn.Module:
    torch.manual_seed(0)
    config = PaperCNNConfig(image_size=8, channels=list(channels), head_groups=head_groups)
    model = build_model("paper_cnn", dataclasses.asdict(config))
    with torch.no_grad():  # non-trivial BN, as after training, so a wrong fold would show
        for block in model.blocks:
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.5, 0.5)
            block[1].running_mean.uniform_(-0.2, 0.2)
            block[1].running_var.uniform_(0.5, 2.0)
    return model


def _decoder(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CharDecoderConfig(
        vocab_size=11, block_size=8, n_embd=16, n_layer=2, head_dim=4, mlp_hidden=[12, 12], **overrides
    )
    model = build_model("char_decoder", dataclasses.asdict(config))
    with torch.no_grad():  # large weights and non-zero biases: a wrong fold would show clearly
        for _, layer in quantized_layers(model):
            layer.weight.uniform_(-0.4, 0.4)
            layer.bias.uniform_(-0.5, 0.5)
            layer.reset_quantizer(8)
    return model


def _set_bits(layer, groups, value=0.0):
    with torch.no_grad():
        layer.bits[groups] = value


def _images(n=5):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _tokens(n=4):
    return torch.randint(0, 11, (n, 8), generator=torch.Generator().manual_seed(1))


def test_zero_bit_conv_channel_still_leaks_bn_shift_until_silenced():
    # Why pruning silences first: a zero-bit conv channel is not zero after BN + ReLU.
    model = _cnn().train()
    _set_bits(model.blocks[0][0], [2])
    with torch.no_grad():
        model.blocks[0][1].bias[2] = 0.7
        leaked = model.blocks[0](_images())[:, 2]
        assert torch.allclose(leaked, torch.full_like(leaked, 0.7), atol=1e-4)
        assert zero_bit_groups(model) == {"blocks.0.0": [2]}
        silence_channels(model, {"blocks.0": [2]})
        for mode in (True, False):
            assert torch.equal(model.train(mode).blocks[0](_images())[:, 2], torch.zeros_like(leaked))


@pytest.mark.parametrize("train_mode", [False, True])
def test_pruned_cnn_equals_silenced_masked_cnn_and_rebuilds_from_config(train_mode):
    model = _cnn().train(train_mode)
    _set_bits(model.blocks[0][0], [1, 4])
    _set_bits(model.blocks[1][0], [0, 2, 3])
    x = _images()
    masked = copy.deepcopy(model)
    silence_channels(masked, {"blocks.0": [1, 4], "blocks.1": [0, 2, 3]})
    with torch.no_grad():
        expected = masked(x)
        removed = prune(model)
        got = model(x)
    assert removed == {"blocks.0": [1, 4], "blocks.1": [0, 2, 3]}
    assert model.config.channels == [4, 2]
    assert model.blocks[0][0].weight.shape == (4, 1, 3, 3) and model.blocks[1][0].weight.shape == (2, 4, 3, 3)
    assert model.blocks[1][1].running_mean.shape == (2,) and model.head.weight.shape == (10, 2 * 2 * 2)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert zero_bit_groups(model) == {}
    rebuilt = build_model(model_name(model), dataclasses.asdict(model.config)).train(train_mode)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), got)


@pytest.mark.parametrize("train_mode", [False, True])
def test_zero_bit_head_group_removes_its_channel_exactly(train_mode):
    model = _cnn(head_groups="channel").train(train_mode)
    assert model.head.quant_groups == 5
    _set_bits(model.head, [1, 3])  # the head ignores channels 1 and 3: their conv bits do not matter
    _set_bits(model.blocks[1][0], [0])  # and conv channel 0 has no bits of its own
    x = _images()
    masked = copy.deepcopy(model)
    silence_channels(masked, {"blocks.1": [0]})  # the only channel whose removal changes the output
    with torch.no_grad():
        expected = masked(x)
        assert zero_bit_groups(model) == {"blocks.1.0": [0], "head": [1, 3]}
        removed = prune(model)
        got = model(x)
    assert removed == {"blocks.1": [0, 1, 3]} and model.config.channels == [6, 2]
    assert model.head.weight.shape == (10, 2 * 2 * 2) and model.head.bits.shape == (2,)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    rebuilt = build_model(model_name(model), dataclasses.asdict(model.config)).train(train_mode)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), got)


def test_head_group_dead_in_a_snapshot_only_is_not_pruned():
    model = _cnn(head_groups="channel")
    _set_bits(model.head, [2, 4])
    snapshot = {name: layer.bits.detach().clone() for name, layer in quantized_layers(model)}
    _set_bits(model.head, [2], 1.5)  # restored since the snapshot
    assert common_units(zero_bit_groups(model), zero_bit_groups(model, snapshot)) == {"head": [4]}


def test_cnn_block_keeps_one_channel_when_all_bits_are_zero():
    model = _cnn(channels=(3, 4)).eval()
    _set_bits(model.blocks[1][0], [0, 1, 2, 3])
    assert prune(model) == {"blocks.1": [1, 2, 3]}
    assert model.config.channels == [3, 1]
    assert model(_images()).shape == (5, 10)


def test_units_dead_in_a_snapshot_and_now_are_their_intersection():
    model = _decoder()
    _set_bits(model.blocks[0].attn.v_proj, [0, 2])
    snapshot = {name: layer.bits.detach().clone() for name, layer in quantized_layers(model)}
    _set_bits(model.blocks[0].attn.v_proj, [0], 3.0)  # restored since the snapshot
    _set_bits(model.blocks[1].mlp[0], [4])  # newly dead
    assert zero_bit_groups(model, snapshot) == {"blocks.0.attn.v_proj": [0, 2]}
    assert zero_bit_groups(model) == {"blocks.0.attn.v_proj": [2], "blocks.1.mlp.0": [4]}
    assert common_units(zero_bit_groups(model), zero_bit_groups(model, snapshot)) == {"blocks.0.attn.v_proj": [2]}


def test_pruned_decoder_heads_and_hidden_units_fold_their_constants_exactly():
    model = _decoder().eval()
    _set_bits(model.blocks[0].attn.v_proj, [1, 3])
    _set_bits(model.blocks[0].attn.q_proj, [2])  # q alone does not make a head removable
    _set_bits(model.blocks[1].mlp[0], [0, 5, 11])
    x = _tokens()
    with torch.no_grad():
        expected = model(x)
        removed = prune(model)
        got = model(x)
    assert removed == {"blocks.0.attn": [1, 3], "blocks.1.mlp": [0, 5, 11]}
    assert model.config.n_heads == [2, 4] and model.config.mlp_hidden == [12, 9]
    assert model.blocks[0].attn.q_proj.weight.shape == (8, 16) and model.blocks[0].attn.out_proj.weight.shape == (16, 8)
    assert model.blocks[0].attn.v_proj.bits.shape == (2,)
    assert model.blocks[1].mlp[2].weight.shape == (16, 9)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    rebuilt = build_model("char_decoder", dataclasses.asdict(model.config)).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), got)


@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_decoder_without_folding_would_differ(branch):
    # Guards the test above: the folded constants are large enough to be seen.
    model = _decoder().eval()
    layer = model.blocks[0].attn.v_proj if branch == "attn" else model.blocks[1].mlp[0]
    _set_bits(layer, [1, 3])
    x = _tokens()
    with torch.no_grad():
        expected = model(x)
        layer.bias.zero_()
        assert (model(x) - expected).abs().max() > 1e-2  # 1000x the tolerance of the folds


def test_decoder_block_can_lose_every_head_and_unit_and_still_trains():
    model = _decoder().train()
    _set_bits(model.blocks[1].attn.v_proj, [0, 1, 2, 3])
    _set_bits(model.blocks[1].mlp[0], list(range(12)))
    x = _tokens()
    with torch.no_grad():
        expected = model(x)
    prune(model)
    # every head goes; a linear layer keeps its last unit, masked (zero bits, exact zeros)
    assert model.config.n_heads == [4, 0] and model.config.mlp_hidden == [12, 1]
    got = model(x)
    assert torch.allclose(got, expected, atol=1e-5)
    got.sum().backward()  # the emptied layers are frozen, everything else still learns
    assert not model.blocks[1].attn.q_proj.weight.requires_grad
    assert model.blocks[1].attn.out_proj.bias.grad is not None


def test_optimizer_state_is_cut_with_the_parameters():
    model = _cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(_images()).square().mean() + 0.01 * average_bits(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    conv1 = model.blocks[1][0]
    before = {key: value.clone() for key, value in optimizer.state[conv1.weight].items()}
    bits_state = optimizer.state[conv1.bits]["exp_avg"].clone()
    _set_bits(model.blocks[0][0], [0])
    _set_bits(conv1, [3])
    prune(model, optimizer)
    state = optimizer.state[conv1.weight]
    assert state["exp_avg"].shape == conv1.weight.shape == (4, 5, 3, 3)
    keep_out, keep_in = [0, 1, 2, 4], [1, 2, 3, 4, 5]
    assert torch.equal(state["exp_avg_sq"], before["exp_avg_sq"][keep_out][:, keep_in])
    assert torch.equal(optimizer.state[conv1.bits]["exp_avg"], bits_state[keep_out])
    assert torch.equal(state["step"], before["step"])
    loss = model(_images()).square().mean() + 0.01 * average_bits(model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()  # shapes of params, grads and state agree


def test_only_limits_the_groups_and_names_a_bad_layer():
    model = _cnn().eval()
    _set_bits(model.blocks[0][0], [1, 4])
    report = prune_zero_bit_units(model, _images(), only={"blocks.0.0": [4]})
    assert [c.removed.get("output channels") for c in report.changes if c.layer == "blocks.0.0"] == [[4]]
    assert model.config.channels == [5, 5]
    with pytest.raises(ValueError, match="not a quantized layer"):
        prune_zero_bit_units(_cnn(), _images(), only={"blocks.0": [1]})
