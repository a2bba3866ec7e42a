"""Quantized layers, quantize_model and the bit-accounting helpers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgsc.nn import (
    QCausalSelfAttention,
    QConv2d,
    QLinear,
    average_bits,
    model_bits_report,
    quantize_model,
    quantized_layers,
)
from sgsc.nn.layers import initial_exponent
from sgsc.ops import reference


def _randomize_quantizer(layer, seed: int) -> None:
    """Uneven bits (one pruned group, one fractional) and shifted exponents, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.bits.copy_(torch.randint(1, 9, layer.bits.shape, generator=gen).float())
        layer.bits[0] = 0.0
        if layer.quant_groups > 1:
            layer.bits[1] = 3.4
        layer.exponent.add_(torch.randint(-1, 2, layer.exponent.shape, generator=gen).float())


@pytest.mark.parametrize("rounding", ["nearest", "floor"])
@pytest.mark.parametrize("quant_groups", [None, 1, 3])
def test_qlinear_forward_is_float_linear_on_reference_weights(quant_groups, rounding):
    torch.manual_seed(0)
    layer = QLinear(7, 6, quant_groups=quant_groups, rounding=rounding)
    _randomize_quantizer(layer, seed=1)
    x = torch.randn(5, 7)
    expected_weight = reference.fake_quantize(layer.weight, layer.bits, layer.exponent, rounding)
    assert torch.equal(layer.quantized_weight(), expected_weight)
    assert torch.equal(layer(x), F.linear(x, expected_weight, layer.bias))


@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_qlinear_grouped_by_input_quantizes_each_column_block_on_its_own_grid(rounding):
    torch.manual_seed(0)
    layer = QLinear(12, 5, quant_groups=4, group_by="input", rounding=rounding)
    _randomize_quantizer(layer, seed=3)
    expected = torch.empty_like(layer.weight)
    for g in range(4):  # group g: columns [3g, 3g + 3) of every row, one (bits, exponent) pair
        block = layer.weight.detach()[:, 3 * g:3 * g + 3]
        expected[:, 3 * g:3 * g + 3] = reference.fake_quantize(
            block.reshape(1, -1), layer.bits[g:g + 1], layer.exponent[g:g + 1], rounding).reshape(5, 3)
    assert torch.equal(layer.quantized_weight(), expected)
    assert torch.equal(layer.ungrouped(layer.grouped(layer.weight)), layer.weight)
    assert torch.equal(layer.quantized_weight()[:, :3], torch.zeros(5, 3))  # group 0 pruned
    x = torch.randn(2, 12)
    assert torch.equal(layer(x), F.linear(x, expected, layer.bias))
    assert "group_by='input'" in repr(layer)


def test_qlinear_grouped_by_input_gets_gradients_in_its_own_layout():
    torch.manual_seed(0)
    layer = QLinear(6, 4, quant_groups=3, group_by="input", init_bits=3)
    grad_out = torch.randn(4, 6)
    layer.quantized_weight().backward(grad_out)
    # straight-through: the initial grid clips no weight, so every weight gets grad_out unpermuted
    assert torch.equal(layer.weight.grad, grad_out)
    assert layer.bits.grad.shape == (3,) and layer.exponent.grad.shape == (3,)
    assert torch.isfinite(layer.exponent.grad).all() and layer.exponent.grad.abs().sum() > 0


def test_qlinear_grouped_by_input_initial_exponents_fit_each_column_block():
    layer = QLinear(4, 2, quant_groups=2, group_by="input", init_bits=4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 3.0, 0.0], [0.05, 0.0, 0.0, -1.0]]))
    layer.reset_quantizer(4)
    assert layer.exponent.tolist() == [-5.0, -1.0]  # ceil(log2(0.2 / 7)), ceil(log2(3 / 7))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (3, 1), "stride": 2, "dilation": 2, "bias": False},
        {"kernel_size": 3, "groups": 2, "quant_groups": 2, "padding_mode": "reflect", "padding": 1},
    ],
)
def test_qconv2d_forward_is_float_conv_on_reference_weights(kwargs):
    torch.manual_seed(0)
    layer = QConv2d(4, 6, **kwargs)
    _randomize_quantizer(layer, seed=2)
    plain = nn.Conv2d(4, 6, **{k: v for k, v in kwargs.items() if k != "quant_groups"})
    with torch.no_grad():
        plain.weight.copy_(reference.fake_quantize(layer.weight, layer.bits, layer.exponent))
        if plain.bias is not None:
            plain.bias.copy_(layer.bias)
    x = torch.randn(2, 4, 9, 7)
    assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("make", [lambda: QLinear(6, 4), lambda: QConv2d(3, 4, 3)])
def test_gradients_reach_weight_bits_and_exponent(make):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.bits.fill_(2.0)  # coarse enough that some weights clip, which is what moves b
    x = torch.randn(3, 6) if isinstance(layer, QLinear) else torch.randn(3, 3, 5, 5)
    layer(x).square().sum().backward()
    for name in ("weight", "bits", "exponent"):
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_initial_exponent_fits_the_weight_range():
    w = torch.tensor([[0.5, -0.25], [3.0, 1.0], [0.0, 0.0], [-0.01, 0.002]])
    e = initial_exponent(w, 4, bits=8)
    expected = [torch.ceil(torch.log2(torch.tensor(m / 127.0))).item() for m in (0.5, 3.0)]
    assert e[:2].tolist() == expected
    assert e[2] == 0  # an all-zero group
    q = reference.fake_quantize(w, torch.full((4,), 8.0), e)
    step = torch.exp2(e).unsqueeze(1)
    assert ((q - w).abs() <= step / 2).all()  # no weight clips: error is at most half a step



def test_initial_exponent_of_a_meta_weight_has_the_shape_and_no_values():
    e = initial_exponent(torch.empty(6, 3, device="meta"), 3, bits=8)
    assert e.is_meta and e.shape == (3,) and e.dtype == torch.float32

def test_layers_start_with_small_quantization_error():
    torch.manual_seed(0)
    layer = QLinear(64, 32, init_bits=8)
    relative = (layer.quantized_weight() - layer.weight).norm() / layer.weight.norm()
    assert relative < 0.01


def test_pruned_group_zeroes_its_output_channels():
    torch.manual_seed(0)
    linear, conv = QLinear(5, 4), QConv2d(2, 4, 3)
    with torch.no_grad():
        linear.bits[2] = 0.0
        conv.bits[1] = -0.5
    y = linear(torch.randn(3, 5))
    assert torch.equal(y[:, 2], linear.bias[2].expand(3))
    assert not torch.equal(y[:, 1], linear.bias[1].expand(3))
    z = conv(torch.randn(2, 2, 6, 6))
    assert torch.equal(z[:, 1], conv.bias[1].expand_as(z[:, 1]))


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="group_by"):
        QLinear(4, 2, group_by="rows")
    with pytest.raises(ValueError, match="divisor of the 4 input features"):
        QLinear(4, 2, quant_groups=3, group_by="input")
    with pytest.raises(ValueError, match="quant_groups"):
        QLinear(3, 4, quant_groups=3)
    with pytest.raises(ValueError, match="init_bits"):
        QLinear(3, 4, init_bits=0)
    with pytest.raises(TypeError, match="init_bits"):
        QConv2d(3, 4, 3, init_bits="8")
    with pytest.raises(ValueError, match="rounding"):
        QLinear(3, 4, rounding="up")


# ---- attention ------------------------------------------------------------------------------


def test_attention_groups_per_head_and_is_causal():
    torch.manual_seed(0)
    attn = QCausalSelfAttention(n_embd=12, n_heads=3, head_dim=4)
    assert [attn.q_proj.quant_groups, attn.k_proj.quant_groups, attn.v_proj.quant_groups] == [3, 3, 3]
    assert attn.out_proj.quant_groups == 12
    x = torch.randn(2, 6, 12)
    changed = x.clone()
    changed[:, 4:] += 1.0
    assert torch.allclose(attn(x)[:, :4], attn(changed)[:, :4], atol=1e-6)
    assert not torch.allclose(attn(x)[:, 4:], attn(changed)[:, 4:])


def test_attention_pruned_value_group_leaves_a_constant_out_proj_can_absorb():
    torch.manual_seed(0)
    attn = QCausalSelfAttention(n_embd=8, n_heads=2, head_dim=3)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        attn.v_proj.bits[1] = 0.0
        pruned = attn(x)
        # the same function with head 1 removed: its out_proj columns dropped, its constant folded
        attn.v_proj.bits[1] = 8.0
        head = attn.out_proj.quantized_weight()[:, 3:6]
        attn.out_proj.bias += head @ attn.v_proj.bias[3:6]
        attn.out_proj.weight[:, 3:6] = 0.0
        torch.testing.assert_close(pruned, attn(x))


def test_attention_with_no_heads_outputs_its_bias():
    attn = QCausalSelfAttention(n_embd=8, n_heads=0, head_dim=4)
    y = attn(torch.randn(2, 3, 8))
    assert torch.equal(y, attn.out_proj.bias.expand(2, 3, 8))


# ---- quantize_model -------------------------------------------------------------------------


def _float_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, 3)
    )


def test_quantize_model_swaps_layers_and_matches_float_at_16_bits():
    net = _float_net()
    x = torch.randn(4, 1, 6, 6)
    expected = net(x)
    weights = [net[0].weight, net[3].weight, net[5].bias]
    assert quantize_model(net, init_bits=16) is net
    assert [type(net[i]) for i in (0, 3, 5)] == [QConv2d, QLinear, QLinear]
    assert [net[0].weight, net[3].weight, net[5].bias] == weights  # Parameters are taken over, not copied
    torch.testing.assert_close(net(x), expected, rtol=1e-3, atol=1e-4)
    assert [name for name, _ in quantized_layers(net)] == ["0", "3", "5"]


def test_quantize_model_skip_groups_and_rounding():
    net = quantize_model(_float_net(), init_bits=4, skip=["5"], groups={"0": 2}, rounding="floor")
    assert type(net[5]) is nn.Linear
    assert net[0].quant_groups == 2 and net[3].quant_groups == 8
    assert net[0].rounding == net[3].rounding == "floor"
    assert net[3].bits.detach().eq(4.0).all()
    with pytest.raises(ValueError, match="skip"):
        quantize_model(_float_net(), skip=["nope"])
    with pytest.raises(ValueError, match="layer 0"):
        quantize_model(_float_net(), groups=3)


def test_quantize_model_keeps_tied_weights_tied():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_model(net)
    assert net[0] is net[2] and isinstance(net[0], QLinear)


def test_quantize_model_warns_about_layers_it_leaves_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.Conv3d(2, 2, 1))
    net.add_module("mha", nn.MultiheadAttention(4, 2, kdim=3))
    with pytest.warns(UserWarning, match=r"1 \(Conv3d.*mha \(MultiheadAttention: only kdim == vdim"):
        quantize_model(net)
    assert type(net.mha) is nn.MultiheadAttention and type(net.mha.out_proj) is not QLinear  # left whole
    assert isinstance(net[0], QLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(_float_net())  # only supported layers: silent


def test_quantize_model_works_in_place_and_refuses_a_bare_layer():
    net = nn.Sequential(nn.Linear(3, 2))
    assert quantize_model(net) is net and isinstance(net[0], QLinear)
    with pytest.raises(TypeError, match=r"a bare Linear cannot replace itself.*QLinear.from_float\(layer\)"):
        quantize_model(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="model"):
        quantize_model("net")
    with pytest.raises(TypeError, match="float64"):
        quantize_model(nn.Linear(3, 2).double())


# ---- bit accounting -------------------------------------------------------------------------


def test_average_bits_by_hand_and_its_gradient():
    net = nn.Sequential(QLinear(3, 4, quant_groups=2), QConv2d(1, 2, 2))  # 12 + 8 weights
    with torch.no_grad():
        net[0].bits.copy_(torch.tensor([4.0, -1.0]))
        net[1].bits.copy_(torch.tensor([2.5, 8.0]))
    expected = (4.0 * 6 + 0.0 * 6 + 2.5 * 4 + 8.0 * 4) / 20
    value = average_bits(net)
    assert value.item() == pytest.approx(expected)
    value.backward()
    assert net[0].bits.grad.tolist() == pytest.approx([6 / 20, 0.0])  # relu: no push below zero
    assert net[1].bits.grad.tolist() == pytest.approx([4 / 20, 4 / 20])
    with pytest.raises(ValueError, match="no quantized layers"):
        average_bits(nn.Linear(2, 2))


def test_model_bits_report():
    net = nn.Sequential(QLinear(3, 4, quant_groups=2), QConv2d(1, 2, 2))
    with torch.no_grad():
        net[0].bits.copy_(torch.tensor([4.0, 0.0]))
        net[1].bits.copy_(torch.tensor([2.5, 8.0]))
    report = json.loads(json.dumps(model_bits_report(net)))
    assert [row["name"] for row in report["layers"]] == ["0", "1"]
    assert report["layers"][0]["pruned_groups"] == 1
    assert report["layers"][1]["storage_bits"] == 3 * 4 + 8 * 4  # 2.5 bits are stored in 3
    assert report["storage_bits"] == 4 * 6 + 44
    assert report["total_weights"] == 20
    assert report["average_bits"] == pytest.approx((24 + 10 + 32) / 20)
    assert report["compression_ratio"] == pytest.approx(32 * 20 / 68)
