"""sgsc::unpack_linear, the product of the packed runtime's small linear layers (PackedStreamLinear), against a
float64 product of the same codes built independently of the stream, within the fp32 bound of a dot product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from packed_codes import dense_weight, random_layer  # noqa: E402

from sgsc import ops
from sgsc.ops import library

EPS = 2.0**-24


def stream_layer(widths, rows_per_group, in_features, seed):
    """(codes, scales, stream, widths tensor) of a layer with one width per group of output rows."""
    codes, scales = random_layer(len(widths) * rows_per_group, in_features, widths, "output", seed)
    widths_t = torch.tensor(widths, dtype=torch.uint8)
    stream = ops.pack(codes.reshape(len(widths), -1).to(torch.int32), widths_t)
    return codes, scales, stream, widths_t


def assert_within_fp32_bound(got, x, weight, bias):
    """|got - x W^T - b| <= (K + 2) eps (|x| |W|^T + |b|), the bound of an fp32 dot product of length K."""
    x64 = x.double().reshape(-1, weight.shape[1])
    exact = x64 @ weight.T + (0 if bias is None else bias.double())
    bound = (weight.shape[1] + 2) * EPS * (x64.abs() @ weight.abs().T + (0 if bias is None else bias.double().abs()))
    err = (got.double().reshape(exact.shape) - exact).abs()
    assert bool((err <= bound + 1e-30).all()), f"max excess {float((err - bound).max()):.3e}"


@settings(max_examples=60, deadline=None)
@given(widths=st.lists(st.integers(0, 32), min_size=1, max_size=5), rows_per_group=st.integers(1, 7),
       in_features=st.integers(1, 70), batch=st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 17]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_the_float64_product_on_awkward_shapes(widths, rows_per_group, in_features, batch, with_bias, seed):
    # rows_per_group * in_features * width not a multiple of 8: rows start inside a byte of the stream
    codes, scales, stream, widths_t = stream_layer(widths, rows_per_group, in_features, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_features, generator=gen)
    bias = torch.randn(codes.shape[0], generator=gen) if with_bias else None
    got = torch.ops.sgsc.unpack_linear(x, stream, widths_t, scales, rows_per_group, in_features, bias)
    assert got.shape == (batch, codes.shape[0])
    assert_within_fp32_bound(got, x, dense_weight(codes, scales, "output"), bias)


def test_a_layer_without_inputs_gives_its_bias():
    widths, scales = torch.tensor([3, 0], dtype=torch.uint8), torch.ones(2)
    bias = torch.randn(4)
    got = torch.ops.sgsc.unpack_linear(torch.zeros(5, 0), torch.zeros(0, dtype=torch.uint8), widths, scales, 2, 0, bias)
    assert torch.equal(got, bias.expand(5, 4))


@pytest.mark.parametrize("in_features", [511, 512, 513, 1500])  # one, two and three chunks of 512 columns
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_long_rows_are_summed_over_chunks_of_columns(in_features, batch):
    codes, scales, stream, widths_t = stream_layer([3, 8, 1, 5], 5, in_features, seed=in_features + batch)
    x, bias = torch.randn(2, batch, in_features), torch.randn(codes.shape[0])
    got = torch.ops.sgsc.unpack_linear(x, stream, widths_t, scales, 5, in_features, bias)
    assert got.shape == (2, batch, codes.shape[0])  # leading dimensions kept, as F.linear
    assert_within_fp32_bound(got, x, dense_weight(codes, scales, "output"), bias)


def test_the_reference_kernel_is_dequantization_then_f_linear():
    codes, scales, stream, widths_t = stream_layer([4, 0, 7], 3, 29, seed=3)
    x, bias = torch.randn(6, 29), torch.randn(9)
    weight = torch.ops.sgsc.unpack_dequantize(stream, widths_t, scales, 3, 29)
    assert torch.equal(library._unpack_linear_reference(x, stream, widths_t, scales, 3, 29, bias),
                       F.linear(x, weight, bias))
    assert_within_fp32_bound(torch.ops.sgsc.unpack_linear(x, stream, widths_t, scales, 3, 29, bias), x,
                             weight.double(), bias)


def test_refuses_bad_arguments_and_passes_opcheck():
    codes, scales, stream, widths_t = stream_layer([3, 5], 2, 6, seed=4)
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match="x must be float32"):  # the C++ op's: see csrc/stable.h
        torch.ops.sgsc.unpack_linear(x.double(), stream, widths_t, scales, 2, 6, None)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\), got \[3, 5\]"):
        torch.ops.sgsc.unpack_linear(x[:, :5], stream, widths_t, scales, 2, 6, None)
    with pytest.raises(ValueError, match="bias must have 4 elements"):
        torch.ops.sgsc.unpack_linear(x, stream, widths_t, scales, 2, 6, torch.zeros(3))
    with pytest.raises(ValueError, match="sgsc.unpack_linear: packed must hold"):
        torch.ops.sgsc.unpack_linear(x, stream[:-1], widths_t, scales, 2, 6, None)
    with pytest.raises(ValueError, match="sgsc.unpack_linear: scales must be contiguous with one scale per group"):
        torch.ops.sgsc.unpack_linear(x, stream, widths_t, scales[:1], 2, 6, None)
    with pytest.raises(RuntimeError, match="x must be on packed's device cpu, got meta"):  # the fake kernel
        torch.ops.sgsc.unpack_linear(x.to("meta"), stream, widths_t, scales, 2, 6, None)
    for args in [(x, stream, widths_t, scales, 2, 6, torch.randn(4)), (torch.randn(2, 3, 6), stream, widths_t,
                                                                       scales, 2, 6, None)]:
        torch.library.opcheck(torch.ops.sgsc.unpack_linear.default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_the_cpu():
    codes, scales, stream, widths_t = stream_layer([2, 6, 3], 4, 33, seed=5)
    x, bias = torch.randn(7, 33), torch.randn(12)
    on_gpu = torch.ops.sgsc.unpack_linear(x.cuda(), stream.cuda(), widths_t.cuda(), scales.cuda(), 4, 33, bias.cuda())
    assert_within_fp32_bound(on_gpu.cpu(), x, dense_weight(codes, scales, "output"), bias)
