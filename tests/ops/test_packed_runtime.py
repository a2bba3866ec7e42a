"""The packed runtime: sgsc::packed_linear / packed_dequantize on CPU (C++) and in the
Triton interpreter against the reference twins, sgsc::unpack_dequantize, PackedLinear /
PackedStreamLinear / PackedConv2d / PackedEmbedding, pack_model, packed_module.

Tolerance: outputs are compared with a float64 product of the exact dequantized weight. The fused
CPU kernel sums ``u * x`` (``u = code + 2^(W-1)``) in fp32 and subtracts ``2^(W-1) * sum x``, so
each output may differ by at most ``(K + 2) * 2^-24 * sum_k scale_k * 2^W * |x_k|`` (an fp32 dot
product of K terms bounded by ``scale * 2^W * |x|``, see sgsc/ops/packed.py). We test that bound.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from packed_codes import dense_weight, random_layer  # noqa: E402
from torch import nn

from sgsc import ops
from sgsc.nn import QConv2d, QEmbedding, QLinear
from sgsc.nn.packed import (
    PackedConv2d,
    PackedEmbedding,
    PackedLinear,
    PackedStreamLinear,
    pack_model,
    packed_file_bytes,
    packed_module,
    packed_weight_bytes,
)
from sgsc.ops import library, reference
from sgsc.ops import packed as packed_ops
from sgsc.ops.spec import minimal_widths

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
EPS = 2.0**-24


def bound(x, codes, scales, group_by):
    """Per-output bound of the fp32 error: (K + 2) eps sum_k scale_k 2^W |x_k|, W the width the entry is stored
    at: its column group's (input groups), or its tile's, the widest of the <= 8 rows packed with it (output
    groups; rows are sorted by width, so that is the row's own width except at the boundaries)."""
    k, groups = x.shape[-1], scales.numel()
    if group_by == "output":
        weight = ops.pack_weight(codes, scales, group_by)
        stored = torch.zeros(codes.shape[0], dtype=torch.float64)
        tile_width = weight.seg_table[weight.tile_table[weight.tile_ptr[:-1], 0], 2]
        live = weight.rows >= 0
        stored[weight.rows[live].long()] = torch.exp2(tile_width.double()).unsqueeze(1).expand(weight.rows.shape)[live]
        row_scale = scales.double().repeat_interleave(codes.shape[0] // groups)
        magnitude = (stored * row_scale).unsqueeze(1).expand(codes.shape)
    else:
        grouped = codes.reshape(codes.shape[0], groups, -1).transpose(0, 1).reshape(groups, -1)
        top = torch.exp2(minimal_widths(grouped).double())  # 2^W of each group
        magnitude = (top * scales.double()).repeat_interleave(codes.shape[1] // groups).unsqueeze(0).expand(codes.shape)
    return (k + 2) * EPS * (x.double().abs() @ magnitude.T) + 1e-30


def check_close(y, x, codes, scales, group_by, bias=None):
    exact = x.double() @ dense_weight(codes, scales, group_by).T
    if bias is not None:
        exact = exact + bias.double()
    err = (y.double() - exact).abs()
    tol = bound(x, codes, scales, group_by) + (0 if bias is None else EPS * bias.double().abs())
    assert (err <= tol).all(), f"max err {err.max().item()} over a bound {tol.min().item()}"


widths_mix = st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 24, 32]), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(widths=widths_mix, per_group=st.integers(1, 5), other=st.integers(1, 70), batch=st.sampled_from([1, 2, 3, 5, 8, 9, 13, 16, 17, 40]),
       group_by=st.sampled_from(["output", "input"]), seed=st.integers(0, 2**31), with_bias=st.booleans())
def test_cpu_matches_reference_on_awkward_shapes(widths, per_group, other, batch, group_by, seed, with_bias):
    n_out = len(widths) * per_group if group_by == "output" else other
    n_in = other if group_by == "output" else len(widths) * per_group
    codes, scales = random_layer(n_out, n_in, widths, group_by, seed)
    weight = ops.pack_weight(codes, scales, group_by)
    # Dequantization is exact: code * scale, bit for bit, in both implementations.
    expected = dense_weight(codes, scales, group_by).float()
    assert torch.equal(ops.packed_dequantize(weight), expected)
    assert torch.equal(reference.packed_dequantize(*weight.tensors(), n_out, n_in), expected)
    x = torch.randn(batch, n_in, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(n_out) if with_bias else None
    y = ops.packed_linear(x, weight, bias)
    check_close(y, x, codes, scales, group_by, bias)
    check_close(reference.packed_linear(x, *weight.tensors(), n_out, bias), x, codes, scales, group_by, bias)


# 7 = chunks of 4 + 2 + 1; 64 = one full panel of 8 chunks; 77 and 150 cross panels of 64 batch rows.
@pytest.mark.parametrize("batch", [1, 4, 7, 16, 64, 77, 150])
@pytest.mark.parametrize("group_by", ["output", "input"])
def test_larger_layer_every_thread(batch, group_by):
    widths = [1, 2, 3, 4, 5, 6, 7, 8, 0, 11, 20, 32, 4, 4, 2, 3]
    codes, scales = random_layer(16 * 9, 16 * 13, widths, group_by, 7)
    weight = ops.pack_weight(codes, scales, group_by)
    x = torch.randn(batch, 16 * 13)
    y = ops.packed_linear(x, weight)
    check_close(y, x, codes, scales, group_by)
    assert torch.equal(ops.packed_dequantize(weight), dense_weight(codes, scales, group_by).float())


def test_packing_in_small_steps_gives_the_same_layout(monkeypatch):
    codes, scales = random_layer(40, 24, [3, 0, 7, 17, 32], "output", 3)
    whole = ops.pack_weight(codes, scales)
    monkeypatch.setattr(packed_ops, "_STAGING_CODES", 8 * 24)  # one tile of 8 rows per step
    stepped = ops.pack_weight(codes.to(torch.int32), scales)
    assert all(torch.equal(a, b) for a, b in zip(whole.tensors(), stepped.tensors()))
    assert torch.equal(ops.packed_dequantize(stepped), codes.float() * scales.repeat_interleave(8).unsqueeze(1))


def test_worked_example_bytes():
    """The example of sgsc/ops/packed.py's docstring, byte for byte."""
    codes = torch.tensor([[-4, 1, 0], [3, 0, -1]])
    weight = ops.pack_weight(codes, torch.tensor([0.5, 0.25]), "output")
    assert weight.words.tolist() == [0x128, 0x0E7, 0, 0, 0, 0, 0, 0]
    assert weight.seg_table.tolist() == [[0, 3, 3]] and weight.seg_scale.tolist() == [1.0]
    assert weight.tile_table.tolist() == [[0, 0]] and weight.tile_ptr.tolist() == [0, 1]
    assert weight.rows.tolist() == [[0, 1, -1, -1, -1, -1, -1, -1]]
    assert weight.row_scale.tolist() == [[0.5, 0.25, 0, 0, 0, 0, 0, 0]]
    assert ops.packed_dequantize(weight).tolist() == [[-2.0, 0.5, 0.0], [0.75, 0.0, -0.25]]


def test_rows_sorted_by_width_and_pruned_rows_cost_nothing():
    widths = [2, 0, 8, 2, 0]
    codes, scales = random_layer(5 * 3, 40, widths, "output", 3)
    weight = ops.pack_weight(codes, scales, "output")
    assert sorted(weight.seg_table[:, 2].tolist()) == [2, 8]  # no segment of width 0
    live = (weight.rows >= 0).sum().item()
    assert live == 9  # 3 groups x 3 rows; the pruned 6 rows are in no tile
    y = ops.packed_linear(torch.randn(2, 40), weight, torch.arange(15.0))
    assert torch.equal(y[:, 3:6], torch.arange(3.0, 6.0).expand(2, 3))  # pruned rows: the bias alone


def test_empty_and_fully_pruned_layers():
    for codes, scales in [(torch.zeros(4, 6, dtype=torch.int64), torch.ones(2)), (torch.zeros(0, 6, dtype=torch.int64), torch.ones(0))]:
        weight = ops.pack_weight(codes, scales, "output")
        assert weight.words.numel() == 0
        assert torch.equal(ops.packed_linear(torch.randn(3, 6), weight), torch.zeros(3, codes.shape[0]))
    weight = ops.pack_weight(torch.ones(3, 4, dtype=torch.int64), torch.ones(3))
    assert ops.packed_linear(torch.randn(0, 4), weight).shape == (0, 3)


# ---- Triton, in the interpreter on CPU tensors (on a GPU through the registered CUDA op) ---------


@needs_triton
@pytest.mark.parametrize("group_by", ["output", "input"])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_triton_matches_reference(group_by, batch):
    from sgsc.kernels import packed_linear as kernels

    widths = [3, 0, 1, 9, 17, 32] if group_by == "input" else [3, 0, 1, 8, 9, 17, 32, 5]
    n_out, n_in = (8 * 3, 67) if group_by == "output" else (11, 6 * 13)
    codes, scales = random_layer(n_out, n_in, widths, group_by, batch)
    weight = ops.pack_weight(codes, scales, group_by)
    x = torch.randn(batch, n_in)
    bias = torch.randn(n_out)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # TRITON_INTERPRET runs CPU tensors
    on_device = packed_ops.to_device(weight, device)
    y = kernels.packed_linear(x.to(device), *on_device.tensors(), n_out, bias.to(device)).cpu()
    check_close(y, x, codes, scales, group_by, bias)
    if device == "cuda":
        check_close(ops.packed_linear(x.cuda(), on_device, bias.cuda()).cpu(), x, codes, scales, group_by, bias)


# ---- argument checks, opcheck, torch.compile ---------------------------------------------------


def small_weight():
    codes, scales = random_layer(12, 10, [3, 5, 0], "output", 1)
    return ops.pack_weight(codes, scales, "output")


def test_bad_arguments_name_the_argument():
    weight = small_weight()
    x = torch.randn(2, 10)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.packed_linear(x.double(), weight)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 10\)"):
        ops.packed_linear(torch.randn(2, 9), weight)
    with pytest.raises(ValueError, match="x must be on weight's device"):
        ops.packed_linear(x.to("meta"), weight)
    with pytest.raises(TypeError, match="bias must be float32"):
        ops.packed_linear(x, weight, torch.zeros(12, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.packed_linear(x, weight, torch.zeros(11))
    with pytest.raises(TypeError, match="weight must be a sgsc.ops.PackedWeight"):
        ops.packed_linear(x, torch.zeros(12, 10))
    every_other = torch.empty(weight.rows.shape[0], 16)[:, ::2].copy_(weight.row_scale)
    strided = packed_ops.PackedWeight(*weight.tensors()[:6], every_other, 12, 10)
    with pytest.raises(ValueError, match="weight.row_scale must be contiguous"):
        ops.packed_linear(x, strided)
    wrong = packed_ops.PackedWeight(weight.words.long(), *weight.tensors()[1:], 12, 10)
    with pytest.raises(TypeError, match="weight.words must be int32"):
        ops.packed_linear(x, wrong)
    with pytest.raises(ValueError, match="out must hold 120 elements"):
        ops.packed_dequantize(weight, out=torch.empty(119))
    with pytest.raises(TypeError, match="codes must be int32 or int64"):
        ops.pack_weight(torch.zeros(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="scales has 3 groups, which do not divide the 2 rows"):
        ops.pack_weight(torch.zeros(2, 2, dtype=torch.int32), torch.ones(3))
    # The op itself (what the wrapper protects) refuses a non-contiguous x and a corrupt layout.
    with pytest.raises(ValueError, match="x must be contiguous"):
        torch.ops.sgsc.packed_linear(torch.randn(10, 2).T, *weight.tensors(), 12, None)
    bad_rows = weight.rows.clone()
    bad_rows[0, 0] = 99
    with pytest.raises(ValueError, match="is not an output row"):
        torch.ops.sgsc.packed_linear(x, *weight.tensors()[:5], bad_rows, weight.row_scale, 12, None)
    twice = weight.rows.clone()
    twice[0, 1] = twice[0, 0]  # y is not pre-filled when the lanes cover every row: a repeat must not pass
    with pytest.raises(ValueError, match=f"output row {int(twice[0, 0])} appears in two tile lanes"):
        torch.ops.sgsc.packed_linear(x, *weight.tensors()[:5], twice, weight.row_scale, 12, None)


@pytest.mark.parametrize("native_checks", [True, False], ids=["cpu-op-checks", "python-checks-once"])
def test_a_packed_layer_checks_its_weight_again_after_a_buffer_changes(monkeypatch, native_checks):
    # On CPU the C++ op checks the layout on every call; where it does not (CUDA), the layer checks it
    # in Python once, and again only after a buffer is replaced or changed in place.
    monkeypatch.setattr(packed_ops, "NATIVE_CPU_CHECKS", native_checks)
    weight = small_weight()
    layer = PackedLinear(weight)
    x = torch.randn(2, 10)
    expected = ops.packed_linear(x, weight)
    assert torch.equal(layer(x), expected) and torch.equal(layer(x), expected)
    layer.words = weight.words.long()  # replaced
    # the C++ op's dtype check is a ValueError: across the stable ABI no C++ exception becomes TypeError
    with pytest.raises(TypeError if not native_checks else ValueError,
                       match="words must be int32" if not native_checks else "words must be Int"):
        layer(x)
    layer.words = weight.words.clone()
    assert torch.equal(layer(x), expected)
    with torch.no_grad():
        layer.row_scale.as_strided_((layer.row_scale.shape[0], 4), (8, 2))  # changed in place: not contiguous
    with pytest.raises(ValueError, match="row_scale must be contiguous"):
        layer(x)
    with torch.inference_mode():  # built from inference tensors, which keep no version counter
        assert torch.equal(PackedLinear(packed_ops.PackedWeight(*(t.clone() for t in small_weight().tensors()),
                                                                12, 10))(x), expected)


def test_non_contiguous_x_is_read_like_f_linear():
    weight = small_weight()
    x = torch.randn(10, 3).T  # (3, 10), strided
    assert torch.equal(ops.packed_linear(x, weight), ops.packed_linear(x.contiguous(), weight))


def test_opcheck():
    weight = small_weight()
    args = (*weight.tensors(), 12)
    torch.library.opcheck(torch.ops.sgsc.packed_linear.default, (torch.randn(3, 10), *args, torch.randn(12)))
    torch.library.opcheck(torch.ops.sgsc.packed_linear.default, (torch.randn(20, 10), *args, None))
    torch.library.opcheck(torch.ops.sgsc.packed_dequantize.default, (*args, 10))
    torch.library.opcheck(torch.ops.sgsc.packed_dequantize_out.default, (*args, 10, torch.empty(12, 10)))


def test_compile_fullgraph_traces_packed_linear():
    codes, scales = random_layer(24, 16, [4, 2, 0], "output", 5)
    model = nn.Sequential(PackedLinear.from_codes(codes, scales, torch.randn(24)), nn.ReLU())
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(5, 16)
    assert torch.allclose(compiled(x), model(x))


# ---- modules ---------------------------------------------------------------------------------


def trained_like(layer, seed):
    """Random per-group bit depths 0..9, so a layer mixes widths and pruned groups."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.bits.copy_(torch.randint(0, 10, layer.bits.shape, generator=gen).float())
        layer.bits[0] = 3.0
    return layer


def test_pack_model_matches_the_quantized_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        trained_like(QConv2d(3, 8, 3, padding=1), 1), nn.ReLU(), trained_like(QConv2d(8, 6, 3, stride=2, groups=2), 2),
        nn.Flatten(), trained_like(QLinear(6 * 3 * 3, 10, group_by="input", quant_groups=6), 3), nn.ReLU(),
        trained_like(QLinear(10, 7), 4),
    ).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        pack_model(model)
        # column groups take the fused kernel's tiles; a small layer of output groups keeps its stream
        assert isinstance(model[0], PackedConv2d) and isinstance(model[4], PackedLinear)
        assert isinstance(model[6], PackedStreamLinear)
        assert all(isinstance(m, (PackedConv2d, PackedLinear, PackedStreamLinear, nn.ReLU, nn.Flatten)) for m in model)
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    assert 0 < packed_file_bytes(model) <= packed_weight_bytes(model)


def test_packed_module_from_a_meta_layer_and_grouped_codes():
    layer = QLinear(12, 5, group_by="input", quant_groups=4)
    trained_like(layer, 9)
    codes, scales = reference.integer_codes(layer.grouped(layer.weight.detach()), layer.bits, layer.exponent, "nearest")
    meta = QLinear(12, 5, group_by="input", quant_groups=4, device="meta")
    meta.bias = layer.bias
    packed = packed_module(meta, codes.to(torch.int32), scales)
    assert torch.equal(packed.dequantized_weight(), layer.quantized_weight().detach())
    x = torch.randn(3, 12)
    assert torch.allclose(packed(x), layer(x).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="layer must be"):
        packed_module(nn.ReLU(), codes, scales)


def test_conv_uses_the_shared_buffer_unless_autograd_needs_the_weight():
    from sgsc.nn.packed import WORKSPACE

    conv = trained_like(QConv2d(4, 6, 3, padding=1, padding_mode="reflect"), 11)
    codes, scales = reference.integer_codes(conv.grouped(conv.weight.detach()), conv.bits, conv.exponent, "nearest")
    packed = packed_module(conv, codes, scales)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.allclose(packed(x), conv(x), rtol=1e-5, atol=1e-6)
    assert WORKSPACE.nbytes() >= 6 * 4 * 9 * 4
    x.requires_grad_()
    packed(x).sum().backward()  # the weight autograd saved is its own tensor, not the shared buffer
    assert x.grad is not None


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(0, 32), min_size=1, max_size=6), rows_per_group=st.integers(1, 3),
       row_len=st.integers(1, 37), seed=st.integers(0, 2**16))
def test_unpack_dequantize_is_code_times_scale_exactly(widths, rows_per_group, row_len, seed):
    codes, scales = random_layer(len(widths) * rows_per_group, row_len, widths, "output", seed)
    grouped = codes.reshape(len(widths), -1).to(torch.int32)
    widths_t = torch.tensor(widths, dtype=torch.uint8)
    stream = ops.pack(grouped, widths_t)
    expected = codes.float() * scales.repeat_interleave(rows_per_group).unsqueeze(1)  # float(code): RN, as the op
    got = torch.ops.sgsc.unpack_dequantize(stream, widths_t, scales, rows_per_group, row_len)
    assert got.shape == expected.shape and torch.equal(got, expected)
    out = torch.full((expected.numel(),), float("nan"))
    torch.ops.sgsc.unpack_dequantize_out(stream, widths_t, scales, rows_per_group, row_len, out)
    assert torch.equal(out.view_as(expected), expected)
    # the kernel of CUDA and of a CPU without the C++ build: unpack, then multiply
    assert torch.equal(library._unpack_then_scale(stream, widths_t, scales, rows_per_group, row_len), expected)
    if torch.cuda.is_available():
        on_gpu = torch.ops.sgsc.unpack_dequantize(stream.cuda(), widths_t.cuda(), scales.cuda(), rows_per_group, row_len)
        assert torch.equal(on_gpu.cpu(), expected)


def test_unpack_dequantize_refuses_bad_arguments_and_passes_opcheck():
    widths = torch.tensor([3, 0, 5], dtype=torch.uint8)
    stream = ops.pack(torch.tensor([[1, -2], [0, 0], [-16, 13]], dtype=torch.int32), widths)
    scales = torch.tensor([0.5, 1.0, 0.25])
    with pytest.raises(ValueError, match="scales must be float32"):  # the C++ op's: see csrc/stable.h
        torch.ops.sgsc.unpack_dequantize(stream, widths, scales.double(), 1, 2)
    with pytest.raises(ValueError, match="one scale per group"):
        torch.ops.sgsc.unpack_dequantize(stream, widths, scales[:2], 1, 2)
    with pytest.raises(ValueError, match="packed must hold 3 bytes"):
        torch.ops.sgsc.unpack_dequantize(stream[:1], widths, scales, 1, 2)
    with pytest.raises(ValueError, match="out must be float32 with 6 elements"):
        torch.ops.sgsc.unpack_dequantize_out(stream, widths, scales, 1, 2, torch.empty(5))
    assert torch.equal(torch.ops.sgsc.unpack_dequantize(stream, widths, scales, 1, 2),
                       torch.tensor([[0.5, -1.0], [0.0, 0.0], [-4.0, 3.25]]))
    empty = torch.ops.sgsc.unpack_dequantize(torch.zeros(0, dtype=torch.uint8), widths, scales, 0, 2)
    assert empty.shape == (0, 2)
    torch.library.opcheck(torch.ops.sgsc.unpack_dequantize.default, (stream, widths, scales, 1, 2))
    torch.library.opcheck(torch.ops.sgsc.unpack_dequantize_out.default,
                          (stream, widths, scales, 1, 2, torch.empty(3, 2)))


def test_small_linear_layers_keep_the_file_stream_and_large_ones_the_fused_tiles():
    from sgsc.nn.packed import STREAM_LINEAR_MAX_CODES, workspace_bytes

    small = trained_like(QLinear(40, 24, quant_groups=6), 5)
    large = trained_like(QLinear(STREAM_LINEAR_MAX_CODES // 64 + 1, 64), 6)
    for layer, kind in ((small, PackedStreamLinear), (large, PackedLinear)):
        codes, scales = reference.integer_codes(layer.grouped(layer.weight.detach()), layer.bits, layer.exponent,
                                                "nearest")
        packed = packed_module(layer, codes.to(torch.int32), scales)
        assert isinstance(packed, kind)
        x = torch.randn(5, layer.in_features)
        with torch.no_grad():
            assert torch.allclose(packed(x), layer(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(packed.weight, layer.quantized_weight().detach())
    # the stream form holds the file's bytes plus a width byte and a float32 scale per group
    stream = packed_module(small, *reference.integer_codes(small.grouped(small.weight.detach()), small.bits,
                                                           small.exponent, "nearest"))
    assert packed_weight_bytes(nn.Sequential(stream)) == packed_file_bytes(nn.Sequential(stream)) + 6 * (1 + 4)
    assert workspace_bytes(nn.Sequential(stream)) == 0  # it computes from the stream, dequantizing nothing whole
    x = torch.randn(3, 40, requires_grad=True)
    stream(x).sum().backward()  # autograd saves a weight of its own, not the shared buffer
    assert x.grad is not None
    compiled = torch.compile(nn.Sequential(stream, nn.ReLU()), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), torch.relu(stream(x)))


def test_stream_layers_name_a_bad_input():
    conv = trained_like(QConv2d(4, 6, 3, padding=1), 12)
    linear = trained_like(QLinear(10, 7), 13)
    packed_conv, packed_linear = (packed_module(layer, *reference.integer_codes(
        layer.grouped(layer.weight.detach()), layer.bits, layer.exponent, "nearest")) for layer in (conv, linear))
    assert isinstance(packed_linear, PackedStreamLinear)
    with pytest.raises(TypeError, match="x must be a float32 tensor, got torch.float64"):
        packed_linear(torch.randn(2, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must have 10 features in dimension -1, got shape \(2, 9\)"):
        packed_linear(torch.randn(2, 9))
    with pytest.raises(ValueError, match="x must be on the layer's device cpu, got meta"):
        packed_linear(torch.randn(2, 10, device="meta"))
    with pytest.raises(ValueError, match=r"x must have 4 features in dimension -3, got shape \(2, 3, 5, 5\)"):
        packed_conv(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="x must have 4 features in dimension -3"):
        packed_conv(torch.randn(5, 5))
    unbatched = torch.randn(4, 5, 5)
    with torch.no_grad():  # an unbatched image is an input like nn.Conv2d's
        assert torch.equal(packed_conv(unbatched), packed_conv(unbatched[None])[0])


def test_threads_sharing_a_packed_model_each_dequantize_into_their_own_buffer():
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    model = nn.Sequential(trained_like(QConv2d(3, 8, 3, padding=1), 14), nn.Flatten(),
                          trained_like(QLinear(8 * 6 * 6, 20), 15), nn.ReLU(), trained_like(QLinear(20, 30), 16))
    inputs = [torch.randn(2, 3, 6, 6) for _ in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
        pack_model(model)
        alone = [model(x) for x in inputs]
        with ThreadPoolExecutor(4) as pool:  # every call interleaves with others on the same layers
            together = list(pool.map(lambda x: [model(x) for _ in range(20)][-1], inputs))
    assert all(torch.allclose(a, e, rtol=1e-5, atol=1e-5) for a, e in zip(alone, expected))
    assert all(torch.equal(t, a) for t, a in zip(together, alone))


def test_layers_with_every_output_row_pruned_pack():
    # (torch itself refuses to run a convolution with no output channels; a linear layer runs)
    model = nn.Sequential(QConv2d(3, 0, 3), QLinear(0, 5), nn.ReLU(), QLinear(5, 0))
    pack_model(model)
    assert isinstance(model[0], PackedConv2d) and model[0].weight.shape == (0, 3, 3, 3)
    assert packed_weight_bytes(nn.Sequential(model[0])) == 0
    with torch.no_grad():
        assert torch.equal(model[1](torch.zeros(2, 0)), model[1].bias.expand(2, 5))
        assert model[1:](torch.zeros(2, 0)).shape == (2, 0)


def test_packed_weight_bytes_of_a_large_mixed_layer_stay_within_10_percent_of_the_file():
    gen = torch.Generator().manual_seed(0)
    widths = torch.randint(1, 9, (512,), generator=gen).tolist()
    codes, scales = random_layer(512, 1024, widths, "output", 0)
    model = nn.Sequential(PackedLinear.from_codes(codes, scales))
    assert packed_weight_bytes(model) <= 1.1 * packed_file_bytes(model)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(0, 32), min_size=1, max_size=6), rows_per_group=st.integers(1, 3),
       dim=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_packed_embedding_looks_up_exactly_the_quantized_rows(widths, rows_per_group, dim, seed):
    torch.manual_seed(seed)
    layer = QEmbedding(len(widths) * rows_per_group, dim, quant_groups=len(widths))
    with torch.no_grad():
        layer.bits.copy_(torch.tensor(widths, dtype=torch.float32))
        layer.weight.mul_(10.0 ** torch.randint(-3, 4, ()).item())
    idx = torch.randint(0, layer.num_embeddings, (3, 5))
    packed = pack_model(nn.Sequential(layer))[0]
    assert isinstance(packed, PackedEmbedding)
    with torch.no_grad():
        table = layer.quantized_weight()
        assert torch.equal(packed(idx), F.embedding(idx, table))  # bit for bit: code * scale, as the float runtime
        assert torch.equal(packed.weight, table)


def test_packed_embedding_holds_the_bits_and_refuses_bad_ids():
    torch.manual_seed(0)
    layer = QEmbedding(1000, 64, padding_idx=0, init_bits=4)
    packed = pack_model(nn.Sequential(layer))[0]
    assert packed.padding_idx == 0
    # the codes at 4 bits or less, then per token a width byte, a 4-byte offset and a 4-byte scale
    assert packed.stream.numel() <= 1000 * 64 * 4 // 8 + 5
    assert packed_weight_bytes(nn.Sequential(packed)) == packed.stream.numel() + 1000 * (1 + 4 + 4)
    with pytest.raises(IndexError, match=r"outside \[0, 1000\)"):
        packed(torch.tensor([1, 1000]))
    with pytest.raises(IndexError, match="outside"):
        packed(torch.tensor([-1]))
    with pytest.raises(TypeError, match="idx must be an integer tensor"):
        packed(torch.tensor([1.0]))
    assert packed(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 64)


# ---- loading a packed file onto the packed runtime ----------------------------------------------


def _zoo_file(tmp_path, name: str, config: dict):
    from sgsc import export
    from sgsc.nn import quantized_layers
    from sgsc.nn.zoo import build_model

    torch.manual_seed(0)
    model = build_model(name, config).eval()
    with torch.no_grad():
        for _, layer in quantized_layers(model):  # widths 0..8 mixed within every layer
            layer.bits.copy_(torch.randint(0, 9, layer.bits.shape).float())
    path = tmp_path / f"{name}.sgsc"
    export.save_packed(model, path)
    return model, path


@pytest.mark.parametrize(("name", "config"), [("paper_cnn", {"channels": [8, 16]}),
                                              ("paper_cnn", {"channels": [8, 16], "head_groups": "channel"}),
                                              ("char_decoder", {}),
                                              ("char_decoder", {"n_heads": [0, 4], "mlp_hidden": [0, 32]})])
def test_load_packed_on_the_packed_runtime_computes_what_the_float_runtime_does(tmp_path, name, config):
    from sgsc import export

    model, path = _zoo_file(tmp_path, name, config)
    float_model = export.load_packed(path)
    packed = export.load_packed(path, runtime="packed")
    layers = [m for m in packed.modules() if isinstance(m, (PackedLinear, PackedStreamLinear, PackedConv2d))]
    assert len(layers) == sum(1 for m in model.modules() if isinstance(m, (QLinear, QConv2d)))
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in packed.modules())  # no float weight left
    x = torch.randn(3, 1, 28, 28) if name == "paper_cnn" else torch.randint(0, 27, (2, 16))
    with torch.no_grad():
        expected, got = float_model(x), packed(x)
    # each layer's sums run in another order (the per-layer bound is tested above); end to end, 1e-5 absolute
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert packed_file_bytes(packed) == export.summarize(path).packed_bytes - sum(
        layer.packed_bytes for layer in export.summarize(path).layers if layer.sparse_groups)  # dense groups agree


def test_load_packed_refuses_an_unknown_runtime(tmp_path):
    from sgsc import export

    _, path = _zoo_file(tmp_path, "paper_cnn", {"channels": [4]})
    with pytest.raises(ValueError, match="runtime must be one of"):
        export.load_packed(path, runtime="int8")


def test_eval_and_inspect_report_the_resident_weight_bytes(tmp_path, capsys):
    import json

    from sgsc.cli import main

    _, path = _zoo_file(tmp_path, "paper_cnn", {"channels": [8, 16], "image_size": 8})  # digits are 8x8
    scores = {}
    for runtime in ("float", "packed"):
        assert main(["eval", str(path), "--data", "digits", "--runtime", runtime, "--json"]) == 0
        scores[runtime] = json.loads(capsys.readouterr().out)
    assert scores["packed"]["test"]["accuracy"] == pytest.approx(scores["float"]["test"]["accuracy"], abs=1e-3)
    assert scores["packed"]["resident_weight_bytes"] < scores["float"]["resident_weight_bytes"] / 3
    assert main(["inspect", str(path)]) == 0
    assert f"{scores['packed']['resident_weight_bytes']} bytes on the packed runtime" in capsys.readouterr().out
