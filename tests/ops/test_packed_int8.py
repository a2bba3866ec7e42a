"""The packed runtime's int8-activation path (``activations="int8"``, op ``sgsc::packed_linear_q8``).

Its rule: ``x`` quantized per row in blocks of ``Q8_BLOCK`` columns (from each segment's first column),
then ``F.linear(x_hat, W)`` within the fp32 bound of the float path, and ``F.linear(x, W)`` within
``int8_error_bound``. The oracle here is float64 arithmetic on ``x_hat`` built in this file from the
definition, and on the dequantized weight built from the codes (not from the layout)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packed_codes import dense_weight, random_layer  # noqa: E402

from sgsc import ops
from sgsc.nn.packed import PackedLinear
from sgsc.ops import native, reference
from sgsc.ops import packed as packed_ops
from sgsc.ops.spec import Q8_BLOCK

EPS = 2.0**-24


def x_hat_by_definition(x, ranges):
    """Each row, each column range, each block of Q8_BLOCK columns from the range's start: q = round(x * 127 /
    absmax) (float32 arithmetic, half to even), x_hat = q * (absmax / 127)."""
    out = x.clone()
    for k0, k1 in ranges:
        for m in range(x.shape[0]):
            for b0 in range(k0, k1, Q8_BLOCK):
                block = x[m, b0:min(k1, b0 + Q8_BLOCK)]
                absmax = block.abs().max()
                if absmax == 0:
                    out[m, b0:b0 + block.numel()] = 0
                    continue
                q = torch.round(block * (torch.tensor(127.0) / absmax)).clamp(-127, 127)
                out[m, b0:b0 + block.numel()] = q * (absmax / torch.tensor(127.0))
    return out


def column_ranges(codes, scales, group_by):
    """The column ranges the layout quantizes over: [0, K) for output groups, each unpruned column group otherwise."""
    k, groups = codes.shape[1], scales.numel()
    if group_by == "output":
        return [(0, k)] if codes.any() else []
    cols = k // groups
    return [(g * cols, (g + 1) * cols) for g in range(groups) if codes[:, g * cols:(g + 1) * cols].any()]


def check_int8(y, x, codes, scales, group_by, weight):
    w = dense_weight(codes, scales, group_by)
    x_hat = x_hat_by_definition(x, column_ranges(codes, scales, group_by)).double()
    widest = int(weight.seg_table[:, 2].max()) if weight.seg_table.numel() else 1
    row_scale = (w.abs().amax(1) > 0).double() * scales.double().max()
    fp32 = (x.shape[1] + 2) * EPS * 2.0**widest * x_hat.abs().sum(1, keepdim=True) * row_scale + 1e-30
    err = (y.double() - x_hat @ w.T).abs()
    assert (err <= fp32).all(), f"vs F.linear(x_hat, W): max err {err.max().item()}"
    err_x = (y.double() - x.double() @ w.T).abs()
    assert (err_x <= packed_ops.int8_error_bound(x, weight)).all(), "vs F.linear(x, W): over int8_error_bound"


@settings(max_examples=50, deadline=None)
@given(widths=st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 24]), min_size=1, max_size=5),
       per_group=st.integers(1, 4), other=st.integers(1, 300), batch=st.sampled_from([1, 2, 3, 8, 17]),
       group_by=st.sampled_from(["output", "input"]), seed=st.integers(0, 2**16))
def test_int8_matches_the_definition_on_awkward_shapes(widths, per_group, other, batch, group_by, seed):
    groups = len(widths)
    out_features, in_features = (groups * per_group, other) if group_by == "output" else (other % 40 + 1, groups * per_group * 37)
    codes, scales = random_layer(out_features, in_features, widths, group_by, seed)
    weight = ops.pack_weight(codes, scales, group_by)
    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(seed)) * 3
    x[:, :5] *= 40  # an outlier block
    y = ops.packed_linear(x, weight, activations="int8")
    check_int8(y, x, codes, scales, group_by, weight)
    # the reference twin quantizes x exactly as the definition does
    assert torch.equal(reference.quantize_segments(x, weight.seg_table),
                       x_hat_by_definition(x, column_ranges(codes, scales, group_by)))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_int8_larger_layer_every_thread(bits, batch):
    codes, scales = random_layer(256, 1000, [bits] * 32, "output", bits)
    weight = ops.pack_weight(codes, scales)
    x = torch.randn(batch, 1000)
    check_int8(ops.packed_linear(x, weight, activations="int8"), x, codes, scales, "output", weight)


def test_int8_error_is_small_for_gaussian_activations():
    """The stated size: about 0.5% of the output's norm for Gaussian x (measured 0.4-0.7%; asserted < 1.5%)."""
    codes, scales = random_layer(512, 2048, [4] * 64, "output", 3)
    weight = ops.pack_weight(codes, scales)
    x = torch.randn(4, 2048)
    exact = x.double() @ dense_weight(codes, scales, "output").T
    y = ops.packed_linear(x, weight, activations="int8").double()
    assert (y - exact).norm() / exact.norm() < 0.015


def test_quantize_activations_worked_example():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    x_hat = reference.quantize_activations(x, 4)
    # absmax 1: s = 1/127, q = round(63.5) = 64 (half to even), -127, round(31.75) = 32, 0
    expected = torch.tensor([[64.0, -127.0, 32.0, 0.0]]) * (torch.tensor(1.0) / 127.0)
    torch.testing.assert_close(x_hat[:1], expected, rtol=0, atol=0)
    assert torch.equal(x_hat[1], torch.zeros(4))


def test_int8_zero_rows_bias_and_pruned_rows():
    codes, scales = random_layer(24, 200, [0, 4, 2], "output", 1)
    weight = ops.pack_weight(codes, scales)
    bias = torch.linspace(-1, 1, 24)
    x = torch.randn(3, 200)
    x[1] = 0
    y = ops.packed_linear(x, weight, bias, activations="int8")
    assert torch.equal(y[1], bias)
    assert torch.equal(y[:, :8], bias[:8].expand(3, 8))  # the pruned group's rows are the bias
    check_int8(y - bias, x, codes, scales, "output", weight)


def test_bad_activations_and_inputs_are_refused_by_name():
    codes, scales = random_layer(8, 64, [4], "output", 0)
    weight = ops.pack_weight(codes, scales)
    with pytest.raises(ValueError, match="activations must be one of"):
        ops.packed_linear(torch.randn(1, 64), weight, activations="int4")
    with pytest.raises(TypeError, match="x must be"):
        ops.packed_linear(torch.randn(1, 64, dtype=torch.float64), weight, activations="int8")
    with pytest.raises(ValueError, match="x must have shape"):
        ops.packed_linear(torch.randn(1, 63), weight, activations="int8")
    with pytest.raises(ValueError, match="activations must be one of"):
        PackedLinear(weight, activations="bf16")


@pytest.mark.skipif(not native.available(), reason="needs the C++ extension")
def test_opcheck_int8():
    codes, scales = random_layer(16, 300, [4, 3], "output", 2)
    weight = ops.pack_weight(codes, scales)
    torch.library.opcheck(torch.ops.sgsc.packed_linear_q8, (torch.randn(3, 300), *weight.tensors(), 16, torch.randn(16)))


def test_packed_linear_layer_takes_the_option():
    codes, scales = random_layer(16, 256, [4, 2], "output", 5)
    layer = PackedLinear.from_codes(codes, scales)
    x = torch.randn(2, 3, 256)
    exact = layer(x)
    layer.activations = "int8"
    assert "activations='int8'" in repr(layer)
    y = layer(x)
    assert y.shape == (2, 3, 16) and not torch.equal(y, exact)
    check_int8(y.reshape(6, 16), x.reshape(6, 256), codes, scales, "output", layer.packed_weight)


def test_pack_model_takes_the_option_for_its_packed_linear_layers():
    from torch import nn

    from sgsc.nn import QLinear
    from sgsc.nn.packed import PackedStreamLinear, pack_model

    torch.manual_seed(0)
    model = nn.Sequential(QLinear(40, 24, group_by="input", quant_groups=4), nn.ReLU(), QLinear(24, 5)).eval()
    x = torch.randn(3, 40)
    with torch.no_grad():
        with pytest.raises(ValueError, match="activations must be one of"):
            pack_model(model, activations="int4")
        pack_model(model, activations="int8")
        assert isinstance(model[0], PackedLinear) and model[0].activations == "int8"
        assert isinstance(model[2], PackedStreamLinear)  # a stream layer: float activations
        weight = model[0].packed_weight
        err = (model[0](x).double() - (x.double() @ weight_of(model[0]).double().T + model[0].bias.double())).abs()
        assert (err <= packed_ops.int8_error_bound(x, weight) + 1e-6).all()


def weight_of(layer):
    return ops.packed_dequantize(layer.packed_weight)


def test_load_packed_takes_the_option(tmp_path):
    from sgsc import export
    from sgsc.nn import quantized_layers
    from sgsc.nn.zoo import build_model

    torch.manual_seed(0)
    model = build_model("char_decoder", {"n_embd": 160, "n_layer": 1, "head_dim": 32}).eval()
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.bits.copy_(torch.randint(1, 9, layer.bits.shape).float())
    path = tmp_path / "dec.sgsc"
    export.save_packed(model, path)
    with pytest.raises(ValueError, match="activations must be"):
        export.load_packed(path, activations="int8")  # the float runtime has no int8 path
    packed = export.load_packed(path, runtime="packed")
    int8 = export.load_packed(path, runtime="packed", activations="int8")
    linears = [m for m in int8.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.activations == "int8" for m in linears)  # the MLP's 160x640 layers
    x = torch.randint(0, 27, (2, 16))
    with torch.no_grad():
        exact, approx = packed(x), int8(x)
    assert not torch.equal(exact, approx) and (approx - exact).norm() < 0.05 * exact.norm()
