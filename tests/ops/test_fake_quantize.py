"""fake_quantize: every implementation against the PyTorch reference.

Forward outputs must be bit-exact; gradients must match a float64 run of the reference to
rtol 1e-5, with an absolute slack proportional to the sum of the magnitudes of the summed
terms (the only honest scale for a sum that may cancel to nearly zero).
"""

from __future__ import annotations

import math

import implementations as impls
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sgsc
from sgsc.ops import native as _native
from sgsc.ops import reference
from sgsc.ops.spec import MAX_EXPONENT

ROUNDINGS = ["nearest", "floor"]

# (shape, groups): one element, odd sizes, 4-D conv weights, rows not a multiple of any block,
# per-tensor groups longer than a CPU chunk and per-head groups of several rows.
SHAPES = [
    ((1,), 1),
    ((1, 1), 1),
    ((5,), 5),
    ((12, 7), 3),
    ((33, 5, 3, 3), 33),
    ((64, 576), 64),
    ((6, 1030), 2),
    ((2, 40000), 1),
    ((8, 4, 2, 2), 4),
]


def make_case(shape, groups, *, seed, dtype=torch.float32, whole=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 4).to(dtype)
    b = torch.rand(groups, generator=gen) * 12
    e = torch.randn(groups, generator=gen) * 2 - 3
    if whole:
        b, e = b.round(), e.round()
    b[0] = 0.0  # one pruned group in every case
    if groups > 2:
        b[1] = 32.0
        b[2] = 1.0
    return w.to(device), b.to(device), e.to(device)


def reference_grads_float64(grad_q, w, b, e, rounding):
    """Gradients of the reference in float64, plus per-group sums of |term| for tolerances."""
    w64, b64, e64 = (t.detach().double().requires_grad_() for t in (w, b, e))
    reference.fake_quantize(w64, b64, e64, rounding).backward(grad_q.double())
    # Per-element terms of the group sums: the same formula with one group per element.
    flat_w = w.detach().double().reshape(-1)
    per_group = flat_w.numel() // b.numel()
    b_elem = b.detach().double().repeat_interleave(per_group).requires_grad_()
    e_elem = e.detach().double().repeat_interleave(per_group).requires_grad_()
    reference.fake_quantize(flat_w, b_elem, e_elem, rounding).backward(grad_q.double().reshape(-1))
    magnitude_b = b_elem.grad.abs().reshape(b.numel(), -1).sum(1)
    magnitude_e = e_elem.grad.abs().reshape(e.numel(), -1).sum(1)
    return w64.grad, b64.grad, e64.grad, magnitude_b, magnitude_e


def assert_group_sums_close(actual, expected, magnitude, name):
    actual = actual.double().cpu()
    expected, magnitude = expected.cpu(), magnitude.cpu()
    slack = 1e-5 * expected.abs() + 1e-5 * magnitude + 1e-30
    bad = (actual - expected).abs() > slack
    assert not bad.any(), (
        f"{name}: groups {bad.nonzero().flatten().tolist()[:5]} differ: "
        f"got {actual[bad][:5].tolist()}, expected {expected[bad][:5].tolist()}"
    )


@pytest.mark.parametrize("impl", impls.available())
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_forward_is_bit_exact(impl, rounding, shape, groups):
    whole = not impls.exp2_matches_torch(impl)
    for seed, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        w, b, e = make_case(shape, groups, seed=seed, dtype=dtype, whole=whole, device=impls.device_of(impl))
        q = impls.forward(impl, w, b, e, rounding)
        expected = reference.fake_quantize(w, b, e, rounding)
        assert q.dtype == w.dtype and q.shape == w.shape
        assert torch.equal(q, expected), f"{dtype}: max diff {(q.float() - expected.float()).abs().max()}"


@pytest.mark.parametrize("impl", impls.available())
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_backward_matches_float64_reference(impl, rounding, shape, groups):
    # Whole exponents make 2^-e * w exact in both precisions, so float32 and float64 agree on
    # which side of every clamp bound and rounding step each element lies.
    w, b, e = make_case(shape, groups, seed=7, device=impls.device_of(impl))
    b[-1] = b[-1] + 0.37 if groups > 3 else b[-1]  # a fractional bit depth
    grad_q = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)).to(w.device)
    grad_w, grad_b, grad_e = impls.backward(impl, grad_q, w, b, e, rounding)
    ref_w, ref_b, ref_e, magnitude_b, magnitude_e = reference_grads_float64(grad_q, w, b, e, rounding)
    assert torch.equal(grad_w.double().cpu(), ref_w.cpu())
    assert_group_sums_close(grad_b, ref_b, magnitude_b, "grad_b")
    assert_group_sums_close(grad_e, ref_e, magnitude_e, "grad_e")


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_autograd_gives_exactly_the_requested_gradients(needs):
    w, b, e = make_case((12, 7), 3, seed=5)
    grad_q = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_(need) for t, need in zip((w, b, e), needs)]
    sgsc.fake_quantize(*leaves).backward(grad_q)
    ref_w, ref_b, ref_e, magnitude_b, magnitude_e = reference_grads_float64(grad_q, w, b, e, "nearest")
    if needs[0]:
        assert torch.equal(leaves[0].grad.double(), ref_w)
    if needs[1]:
        assert_group_sums_close(leaves[1].grad, ref_b, magnitude_b, "grad_b")
    if needs[2]:
        assert_group_sums_close(leaves[2].grad, ref_e, magnitude_e, "grad_e")
    assert [leaf.grad is not None for leaf in leaves] == list(needs)


@pytest.mark.skipif(not _native.available(), reason="the C++ extension is not built")
def test_autograd_node_is_the_registered_one():
    # one registration path (sgsc/ops/library.py's register_autograd), with or without the C++ extension
    w, b, e = make_case((4, 3), 2, seed=1)
    q = sgsc.fake_quantize(w.requires_grad_(), b, e)
    assert "sgsc_fake_quantize" in q.grad_fn.name()


def test_double_backward_is_refused_not_silently_wrong():
    w, b, e = make_case((6, 5), 3, seed=4)
    w.requires_grad_()
    (grad_w,) = torch.autograd.grad(sgsc.fake_quantize(w, b, e).square().sum(), w, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad_w.sum().backward()


@pytest.mark.parametrize("impl", impls.available())
def test_fractional_exponents_match_float32_autograd(impl):
    w, b, e = make_case((16, 300), 16, seed=11, whole=False, device=impls.device_of(impl))
    grad_q = torch.randn_like(w)
    grad_w, grad_b, grad_e = impls.backward(impl, grad_q, w, b, e, "nearest")
    leaves = [t.clone().requires_grad_() for t in (w, b, e)]
    reference.fake_quantize(*leaves, "nearest").backward(grad_q)
    # autograd multiplies by 2^e * 2^-e, which is 1 only up to rounding for fractional e
    torch.testing.assert_close(grad_w, leaves[0].grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_b, leaves[1].grad, rtol=1e-4, atol=1e-4 * leaves[1].grad.abs().max().item())
    torch.testing.assert_close(grad_e, leaves[2].grad, rtol=1e-4, atol=1e-4 * leaves[2].grad.abs().max().item())


@pytest.mark.parametrize("impl", impls.available())
def test_pruned_group_is_exactly_zero_with_zero_gradients(impl):
    device = impls.device_of(impl)
    w = torch.tensor([[1.5, float("nan")], [2.0, -3.0]], device=device)
    b = torch.tensor([0.0, 4.0], device=device)
    e = torch.tensor([0.0, 0.0], device=device)
    q = impls.forward(impl, w, b, e, "nearest")
    assert torch.equal(q[0], torch.zeros(2, device=device))
    grad_w, grad_b, grad_e = impls.backward(impl, torch.ones_like(w), w, b, e, "nearest")
    assert torch.equal(grad_w[0], torch.zeros(2, device=device))
    assert grad_b[0].item() == 0.0 and grad_e[0].item() == 0.0


@pytest.mark.parametrize("impl", impls.available())
def test_worked_example(impl):
    # b = 3 bits: codes in [-4, 3]; e = -1: step 0.5. Values hand-computed from eq. (1).
    device = impls.device_of(impl)
    w = torch.tensor([[0.3, 0.75, -0.26, 1.9, -5.0, 0.25]], device=device)
    b = torch.tensor([3.0], device=device)
    e = torch.tensor([-1.0], device=device)
    # scaled: 0.6, 1.5, -0.52, 3.8 -> clamp 3, -10 -> clamp -4, 0.5
    nearest = impls.forward(impl, w, b, e, "nearest")
    floor = impls.forward(impl, w, b, e, "floor")
    assert nearest.cpu().tolist() == [[0.5, 1.0, -0.5, 1.5, -2.0, 0.0]]
    assert floor.cpu().tolist() == [[0.0, 0.5, -0.5, 1.5, -2.0, 0.0]]


@pytest.mark.parametrize("impl", impls.available())
def test_nan_in_w_propagates(impl):
    device = impls.device_of(impl)
    w = torch.tensor([[1.0, float("nan"), -2.0]], device=device)
    q = impls.forward(impl, w, torch.tensor([4.0], device=device), torch.tensor([0.0], device=device), "nearest")
    assert q[0, 0].item() == 1.0 and math.isnan(q[0, 1].item()) and q[0, 2].item() == -2.0


def test_non_finite_b_or_e_is_a_value_error_on_cpu():
    w = torch.randn(4, 3)
    good = torch.zeros(4)
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = good.clone()
        bad[2] = bad_value
        with pytest.raises(ValueError, match="b must be finite"):
            sgsc.fake_quantize(w, bad, good)
        with pytest.raises(ValueError, match="e must be finite"):
            sgsc.fake_quantize(w, good + 4, bad)


@pytest.mark.skipif("triton-interpret" not in impls.available() and "cuda" not in impls.available(), reason="no Triton")
def test_non_finite_b_or_e_poisons_the_group_on_triton():
    impl = "cuda" if torch.cuda.is_available() else "triton-interpret"
    device = impls.device_of(impl)
    w = torch.randn(4, 3, device=device)
    b = torch.tensor([4.0, float("nan"), 4.0, 4.0], device=device)
    e = torch.tensor([0.0, 0.0, float("inf"), 0.0], device=device)
    q = impls.forward(impl, w, b, e, "nearest")
    assert torch.isnan(q[1:3]).all() and torch.isfinite(q[[0, 3]]).all()
    grad_w, grad_b, grad_e = impls.backward(impl, torch.ones_like(w), w, b, e, "nearest")
    assert torch.isnan(grad_b[1:3]).all() and torch.isnan(grad_e[1:3]).all() and torch.isnan(grad_w[1:3]).all()


@pytest.mark.parametrize("impl", impls.available())
def test_exponents_at_the_float32_edges_follow_eq_1(impl):
    """At |e| = MAX_EXPONENT both 2^e and 2^-e are normal float32: eq. (1) holds exactly, zeros included."""
    device = impls.device_of(impl)
    edge = MAX_EXPONENT
    w = torch.tensor([[0.0, 1.5, -3.0e-30], [0.0, 2.0**-120, -(2.0**-125)]], device=device)
    b = torch.tensor([8.0, 8.0], device=device)
    e = torch.tensor([edge, -edge], device=device)
    q = impls.forward(impl, w, b, e, "nearest")
    assert torch.equal(q[0], torch.zeros(3, device=device))  # steps of 2^126 round every weight to 0
    # steps of 2^-126: codes 0, 2^6 and -2^1 are inside the 8-bit range, so the weights come back exactly
    assert torch.equal(q[1], w[1])
    assert torch.equal(q.cpu(), reference.fake_quantize(w.cpu(), b.cpu(), e.cpu()))


@pytest.mark.parametrize("outside", [MAX_EXPONENT + 1, -MAX_EXPONENT - 1, 1e30])
def test_exponents_beyond_the_float32_range_are_refused_on_cpu(outside):
    w, b = torch.zeros(2, 3), torch.full((2,), 8.0)
    e = torch.tensor([0.0, outside])
    with pytest.raises(ValueError, match=r"e must lie in \[-126, 126\], found .* at group 1"):
        sgsc.fake_quantize(w, b, e)
    with pytest.raises(ValueError, match=r"e must lie in \[-126, 126\]"):
        torch.ops.sgsc.fake_quantize_backward(torch.ones_like(w), w, b, e, "nearest")


@pytest.mark.skipif("triton-interpret" not in impls.available() and "cuda" not in impls.available(), reason="no Triton")
def test_exponents_beyond_the_float32_range_poison_the_group_on_triton():
    impl = "cuda" if torch.cuda.is_available() else "triton-interpret"
    device = impls.device_of(impl)
    w = torch.zeros(3, 4, device=device)
    b = torch.full((3,), 8.0, device=device)
    e = torch.tensor([0.0, MAX_EXPONENT + 2, -MAX_EXPONENT - 2], device=device)
    q = impls.forward(impl, w, b, e, "floor")
    assert torch.equal(q[0], w[0]) and torch.isnan(q[1:]).all()


def test_raw_op_refuses_operands_on_another_device():
    """The registered CPU kernel reads b and e on the host; on meta they hold no values to read."""
    w = torch.randn(4, 3)
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="one device|w's device"):
        torch.ops.sgsc.fake_quantize(w, meta, meta, "nearest")
    with pytest.raises(ValueError, match="grad_q is on meta"):
        torch.ops.sgsc.fake_quantize_backward(torch.ones(4, 3, device="meta"), w, torch.ones(4), torch.zeros(4), "nearest")


def test_non_contiguous_input_is_handled():
    base = torch.randn(20, 24)
    w = base.t()  # (24, 20), non-contiguous
    b, e = torch.full((24,), 5.0), torch.full((24,), -2.0)
    assert torch.equal(sgsc.fake_quantize(w, b, e), reference.fake_quantize(w.contiguous(), b, e))
    w_leaf = w.detach().requires_grad_()
    sgsc.fake_quantize(w_leaf, b, e).sum().backward()
    assert w_leaf.grad.shape == w.shape


def test_empty_input_returns_empty():
    w = torch.empty(0, 3)
    q = sgsc.fake_quantize(w, torch.ones(1), torch.zeros(1))
    assert q.shape == (0, 3)


def test_out_variant_writes_in_place():
    w, b, e = make_case((10, 9), 5, seed=1)
    out = torch.full_like(w, 7.0)
    result = sgsc.fake_quantize(w, b, e, out=out)
    assert result is out
    assert torch.equal(out, reference.fake_quantize(w, b, e))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"w": torch.arange(6).reshape(2, 3)}, TypeError, "w must be float32"),
        ({"w": torch.randn(2, 3, dtype=torch.complex64)}, TypeError, "w must be float32"),
        ({"w": torch.randn(2, 3, dtype=torch.float64)}, TypeError, "w must be float32"),
        ({"b": torch.ones(2, dtype=torch.float64)}, TypeError, "b must be float32"),
        ({"e": torch.zeros(2, dtype=torch.int32)}, TypeError, "e must be float32"),
        ({"w": [[1.0]]}, TypeError, "w must be a torch.Tensor"),
        ({"w": torch.tensor(1.0)}, ValueError, "at least one dimension"),
        ({"b": torch.ones(3), "e": torch.zeros(3)}, ValueError, "do not divide"),
        ({"b": torch.ones(2, 1)}, ValueError, "b must be a non-empty 1-D"),
        ({"e": torch.zeros(1)}, ValueError, "e must have the same shape"),
        ({"b": torch.ones(2, device="meta"), "e": torch.zeros(2, device="meta")}, ValueError, "one device"),
        ({"rounding": "stochastic"}, ValueError, "rounding must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = {"w": torch.randn(2, 3), "b": torch.ones(2), "e": torch.zeros(2), "rounding": "nearest"}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sgsc.fake_quantize(args["w"], args["b"], args["e"], rounding=args["rounding"])


def test_opcheck_on_cpu():
    for rounding in ROUNDINGS:
        w, b, e = make_case((8, 13), 4, seed=2)
        args = (w.requires_grad_(), b.requires_grad_(), e.requires_grad_(), rounding)
        torch.library.opcheck(torch.ops.sgsc.fake_quantize.default, args)
        torch.library.opcheck(
            torch.ops.sgsc.fake_quantize_backward.default, (torch.randn(8, 13), w.detach(), b.detach(), e.detach(), rounding)
        )
        torch.library.opcheck(
            torch.ops.sgsc.fake_quantize_out.default, (w.detach(), b.detach(), e.detach(), rounding, torch.empty(8, 13))
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_opcheck_on_cuda():
    w, b, e = make_case((8, 13), 4, seed=2, device="cuda")
    torch.library.opcheck(torch.ops.sgsc.fake_quantize.default, (w.requires_grad_(), b.requires_grad_(), e.requires_grad_(), "nearest"))


class _TinyQuantizedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 8))
        self.bits = torch.nn.Parameter(torch.full((16,), 6.0))
        self.exponent = torch.nn.Parameter(torch.full((16,), -4.0))

    def forward(self, x):
        return torch.nn.functional.linear(x, sgsc.fake_quantize(self.weight, self.bits, self.exponent)).relu().sum()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    net = _TinyQuantizedNet()
    x = torch.randn(4, 8)
    eager_loss = net(x)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(net, fullgraph=True, backend=backend)
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for p, expected in zip(net.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, expected)


@settings(max_examples=60, deadline=None)
@given(
    rows_per_group=st.integers(1, 4),
    groups=st.integers(1, 6),
    inner=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    bits=st.lists(st.one_of(st.integers(0, 32).map(float), st.floats(-2.0, 32.0)), min_size=6, max_size=6),
    exponents=st.lists(st.floats(-40.0, 40.0), min_size=6, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    rounding=st.sampled_from(ROUNDINGS),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_matches_reference(rows_per_group, groups, inner, bits, exponents, dtype, rounding, seed):
    shape = (rows_per_group * groups, *inner)
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10).to(dtype)
    b = torch.tensor(bits[:groups], dtype=torch.float32)
    e = torch.tensor(exponents[:groups], dtype=torch.float32)
    q = sgsc.fake_quantize(w, b, e, rounding=rounding)
    expected = reference.fake_quantize(w, b, e, rounding)
    assert torch.equal(q.isnan(), expected.isnan())
    assert torch.equal(q.nan_to_num(), expected.nan_to_num())
    grad_q = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    grad_w, grad_b, grad_e = torch.ops.sgsc.fake_quantize_backward(grad_q, w, b, e, rounding)
    leaves = [t.clone().requires_grad_() for t in (w, b, e)]
    reference.fake_quantize(*leaves, rounding).backward(grad_q.to(dtype))
    torch.testing.assert_close(grad_w.nan_to_num(), leaves[0].grad.nan_to_num(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0)
    # torch.clamp's autograd sends no gradient to either bound when they coincide, which in float32
    # happens for 0 < b < 2^-24 (2^(b-1) rounds to 1/2); the contract's lo < hi holds for every b > 0,
    # so those groups are checked against float64 in test_tiny_positive_bits_follow_the_contract.
    _, _, lo, hi, _ = reference.group_params(b, e)
    comparable = lo != hi
    for ours, theirs in ((grad_b, leaves[1].grad), (grad_e, leaves[2].grad)):
        finite = theirs.isfinite() & ours.isfinite() & comparable
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4 * (1 + theirs[finite].abs().max().item() if finite.any() else 1))


@pytest.mark.parametrize("impl", impls.available())
def test_tiny_positive_bits_follow_the_contract(impl):
    # b = 2^-52 rounds 2^(b-1) to exactly 1/2 in float32, so lo == hi == -1/2; the clamp
    # indicators of the contract still apply, as a float64 run (where lo < hi) shows.
    w = torch.tensor([[-21.0, 0.25], [3.0, -0.75]])
    b = torch.full((2,), 2.0**-52)
    e = torch.zeros(2)
    grad_q = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    w, b, e, grad_q = (t.to(impls.device_of(impl)) for t in (w, b, e, grad_q))
    grad_w, grad_b, grad_e = impls.backward(impl, grad_q, w, b, e, "floor")
    ref_w, ref_b, ref_e, magnitude_b, magnitude_e = reference_grads_float64(grad_q, w, b, e, "floor")
    assert torch.equal(grad_w.double().cpu(), ref_w.cpu())
    assert grad_b.abs().min() > 0
    assert_group_sums_close(grad_b, ref_b, magnitude_b, "grad_b")
    assert_group_sums_close(grad_e, ref_e, magnitude_e, "grad_e")
