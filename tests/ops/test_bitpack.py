"""sgsc.ops.pack / unpack: the layout, bit-exact round trips and agreement with the reference.

Every implementation is checked against ``sgsc.ops.reference.pack``/``unpack`` (NumPy, bit by bit):
the registered CPU op (C++), the Triton launchers run directly on CPU tensors in the interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` without a GPU), and the CUDA op when a GPU is
present. Interpreter cases stay small: it runs every program in Python.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from sgsc import ops
from sgsc.ops import native as _native
from sgsc.ops import reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

IMPLS = ["cpu"]
if HAS_CUDA:
    IMPLS.append("cuda")
elif HAS_TRITON:
    IMPLS.append("triton-interpret")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")


def _kernels():
    from sgsc.kernels import bitpack

    return bitpack


def run_pack(impl: str, ints: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    if impl == "triton-interpret":
        return _kernels().pack(ints, widths)
    if impl == "cuda":
        return ops.pack(ints.cuda(), widths.cuda()).cpu()
    return ops.pack(ints, widths)


def run_unpack(impl: str, packed, widths, rows_per_group: int, row_len: int) -> torch.Tensor:
    if impl == "triton-interpret":
        return _kernels().unpack(packed, widths, rows_per_group, row_len)
    if impl == "cuda":
        return ops.unpack(packed.cuda(), widths.cuda(), rows_per_group, row_len).cpu()
    return ops.unpack(packed, widths, rows_per_group, row_len)


def random_codes(shape, widths: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """int32 codes of ``shape`` (grouped along dim 0), uniform over each group's range, with each
    group's two extreme codes planted at its start so every range is hit end to end."""
    gen = torch.Generator().manual_seed(seed)
    groups = widths.numel()
    w = widths.to(torch.int64)
    lo = torch.where(w > 0, -(2 ** (w.clamp(min=1) - 1)), 0)
    span = torch.where(w > 0, 2**w, 1)
    rows = torch.rand(groups, int(torch.tensor(shape).prod()) // groups, generator=gen, dtype=torch.float64)
    codes = lo[:, None] + (rows * span[:, None]).long()
    if codes.shape[1] >= 2:
        codes[:, 0], codes[:, 1] = lo, lo + span - 1
    return codes.to(torch.int32).reshape(shape)


# ---- the documented layout -------------------------------------------------------------------

EXAMPLE_WIDTHS = [3, 0, 5]
EXAMPLE_INTS = [[1, -2], [0, 0], [-16, 13]]
EXAMPLE_BYTES = [0x31, 0xB0, 0x01]  # the worked example of sgsc.ops.pack's docstring


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_pack_example(impl):
    widths = torch.tensor(EXAMPLE_WIDTHS, dtype=torch.int32)
    ints = torch.tensor(EXAMPLE_INTS, dtype=torch.int32)
    packed = reference.pack(ints, widths) if impl == "reference" else run_pack(impl, ints, widths)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == EXAMPLE_BYTES
    assert ops.packed_group_offsets(widths, 2).tolist() == [0, 1, 1, 3]
    back = reference.unpack(packed, widths, 1, 2) if impl == "reference" else run_unpack(impl, packed, widths, 1, 2)
    assert back.tolist() == EXAMPLE_INTS


def test_layout_is_lsb_first_within_and_across_bytes():
    # 3-bit codes 1, 2, 3, -4 are 001, 010, 011, 100; written least significant bit first the
    # stream is 1,0,0 | 0,1,0 | 1,1,0 | 0,0,1, and stream bit k is bit k % 8 of byte k // 8.
    packed = ops.pack(torch.tensor([1, 2, 3, -4], dtype=torch.int32), torch.tensor([3]))
    stream = [(packed[k // 8].item() >> (k % 8)) & 1 for k in range(12)]
    assert stream == [1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1]
    assert packed.tolist() == [0b11010001, 0b00001000]  # code 2 (bits 6..8) straddles the bytes


def test_offsets_slice_every_group_stream():
    widths = torch.tensor([3, 0, 5, 32, 1, 7], dtype=torch.uint8)
    ints = random_codes((6, 3, 7), widths)
    packed = ops.pack(ints, widths)
    offsets = ops.packed_group_offsets(widths, 21)
    assert offsets.dtype == torch.int64 and offsets.shape == (7,)
    assert offsets[-1] == packed.numel()
    for g in range(6):
        alone = reference.pack(ints[g : g + 1], widths[g : g + 1])
        assert torch.equal(packed[offsets[g] : offsets[g + 1]], alone), f"group {g}"


# ---- round trips and agreement with the reference --------------------------------------------


@pytest.mark.parametrize("width", range(33))
def test_every_width_matches_reference(width):
    widths = torch.full((3,), width, dtype=torch.int32)
    ints = random_codes((3, 37), widths, seed=width)  # 37 codes: groups end mid-byte for most widths
    packed = ops.pack(ints, widths)
    assert torch.equal(packed, reference.pack(ints, widths))
    assert packed.numel() == 3 * ((width * 37 + 7) // 8)
    assert torch.equal(ops.unpack(packed, widths, 1, 37), ints)
    assert torch.equal(reference.unpack(packed, widths, 1, 37), ints)


@pytest.mark.parametrize(
    ("shape", "widths"),
    [
        ((1,), [13]),  # a single element
        ((1,), [32]),
        ((1,), [0]),
        ((5, 7), [3, 5, 7, 13, 31]),  # odd widths, odd rows
        ((10, 3), [5, 31]),
        ((6, 3, 3, 3), [7, 0, 13]),  # a conv weight: (O, C, kh, kw)
        ((4, 16389), [1, 2, 31, 32]),  # longer than one CPU task (16384 codes), ragged tail
        ((64, 1), list(range(32)) * 2),  # many one-code groups
    ],
)
def test_round_trip_awkward_shapes(shape, widths):
    widths = torch.tensor(widths, dtype=torch.int32)
    ints = random_codes(shape, widths, seed=len(shape))
    packed = ops.pack(ints, widths)
    assert torch.equal(packed, reference.pack(ints, widths))
    rows_per_group, row_len = shape[0] // widths.numel(), ints[0].numel()
    back = ops.unpack(packed, widths, rows_per_group, row_len)
    assert back.shape == (shape[0], row_len)
    assert torch.equal(back.reshape(shape), ints)


def test_millions_of_codes_mixed_widths():
    # 61 groups of 3 CPU tasks each and a 5-code tail: ~3M codes.
    widths = torch.randint(0, 33, (61,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    ints = random_codes((61, 3 * 16384 + 5), widths, seed=3)
    packed = ops.pack(ints, widths)
    assert torch.equal(packed, reference.pack(ints, widths))
    assert torch.equal(ops.unpack(packed, widths, 1, ints.shape[1]), ints)


@pytest.mark.parametrize("seed", range(20))
def test_random_shapes_match_reference(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    groups, rows_per_group, row_len = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (7, 4, 60))
    widths = torch.randint(0, 33, (groups,), generator=gen, dtype=torch.int32)
    ints = random_codes((groups * rows_per_group, row_len), widths, seed=seed)
    packed = ops.pack(ints, widths)
    assert torch.equal(packed, reference.pack(ints, widths))
    assert torch.equal(ops.unpack(packed, widths, rows_per_group, row_len), ints)


def test_non_contiguous_input_and_width_dtypes():
    ints32 = random_codes((9, 8), torch.tensor([4, 4, 4]))
    widths = torch.tensor([4, 4, 4])
    expected = reference.pack(ints32, widths)
    strided = ints32.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    for dtype in (torch.uint8, torch.int32, torch.int64):
        assert torch.equal(ops.pack(strided, widths.to(dtype)), expected)
        assert torch.equal(ops.unpack(expected, widths.to(dtype), 3, 8), ints32)


def test_unpack_into_out():
    widths = torch.tensor([3, 0, 9], dtype=torch.int32)
    ints = random_codes((6, 2, 5), widths)
    packed = ops.pack(ints, widths)
    out = torch.full_like(ints, 77)
    assert ops.unpack(packed, widths, 2, 10, out=out) is out
    assert torch.equal(out, ints)
    with pytest.raises(ValueError, match="out must hold 60 elements"):
        ops.unpack(packed, widths, 2, 10, out=torch.empty(59, dtype=torch.int32))
    with pytest.raises(TypeError, match="out must be int32"):
        ops.unpack(packed, widths, 2, 10, out=torch.empty(60))


def test_same_bytes_with_one_or_many_threads():
    widths = torch.tensor([3, 13, 31, 1], dtype=torch.int32)
    ints = random_codes((4, 40000), widths)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.pack(ints, widths)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ops.pack(ints, widths), one)


@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (0,)])
def test_empty_inputs(shape):
    groups = 3 if shape[0] else 1
    widths = torch.tensor([5] * groups, dtype=torch.int32)
    ints = torch.zeros(shape, dtype=torch.int32)
    packed = ops.pack(ints, widths)
    assert packed.shape == (0,) and packed.dtype == torch.uint8
    assert torch.equal(packed, reference.pack(ints, widths))
    rows_per_group = shape[0] // groups
    row_len = ints[0].numel() if shape[0] else 4
    back = ops.unpack(packed, widths, rows_per_group, row_len)
    assert back.shape == (shape[0], row_len) and back.dtype == torch.int32


# ---- out-of-range codes and bad arguments ----------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize(
    ("width", "code"), [(4, 8), (4, -9), (1, 1), (0, 1), (0, -1), (31, 2**30), (31, -(2**30) - 1)]
)
def test_out_of_range_code_names_the_group(impl, width, code):
    widths = torch.tensor([8, 3, width, 2], dtype=torch.int32)
    ints = torch.zeros((4, 20), dtype=torch.int32)
    ints[2, 11] = code
    ints[3, 0] = 5  # also out of range, in a later group: the first bad group is reported
    expected = reference.out_of_range_message(2, width, 11, code)
    with pytest.raises(ValueError) as info:
        reference.pack(ints, widths) if impl == "reference" else run_pack(impl, ints, widths)
    assert expected in str(info.value)


def test_full_32_bit_range_is_accepted():
    widths = torch.tensor([32], dtype=torch.int32)
    ints = torch.tensor([-(2**31), 2**31 - 1, -1, 0], dtype=torch.int32)
    packed = ops.pack(ints, widths)
    assert packed.tolist() == [0, 0, 0, 0x80, 0xFF, 0xFF, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]
    assert torch.equal(ops.unpack(packed, widths, 1, 4).reshape(-1), ints)


@pytest.mark.parametrize(
    ("ints", "widths", "error", "match"),
    [
        ([1.0, 2.0], [4], TypeError, "ints must be int32"),
        (torch.tensor([1, 2], dtype=torch.int64), [4], TypeError, "ints must be int32"),
        ([1, 2], torch.tensor([4.0]), TypeError, "widths must be uint8, int32 or int64"),
        ([1, 2], torch.tensor([[4]]), ValueError, "widths must be a non-empty 1-D"),
        ([1, 2], torch.tensor([], dtype=torch.int32), ValueError, "widths must be a non-empty 1-D"),
        ([1, 2], [33], ValueError, "widths must be in \\[0, 32\\], got 33 at group 0"),
        ([1, 2], [4, -1], ValueError, "widths must be in \\[0, 32\\], got -1 at group 1"),
        ([1, 2, 3], [4, 4], ValueError, "2 groups, which do not divide ints' first dimension 3"),
        (torch.tensor(1, dtype=torch.int32), [4], ValueError, "ints must have at least one dimension"),
    ],
)
def test_pack_rejects_bad_arguments(ints, widths, error, match):
    if not isinstance(ints, torch.Tensor):
        ints = torch.tensor(ints, dtype=torch.float32 if isinstance(ints[0], float) else torch.int32)
    if not isinstance(widths, torch.Tensor):
        widths = torch.tensor(widths, dtype=torch.int32)
    with pytest.raises(error, match=match):
        ops.pack(ints, widths)


def test_pack_rejects_non_tensors():
    with pytest.raises(TypeError, match="ints must be a torch.Tensor"):
        ops.pack([1, 2], torch.tensor([4]))
    with pytest.raises(TypeError, match="widths must be a torch.Tensor"):
        ops.pack(torch.tensor([1, 2], dtype=torch.int32), [4])


def test_unpack_rejects_bad_arguments():
    widths = torch.tensor([3, 5], dtype=torch.int32)
    packed = torch.zeros(3, dtype=torch.uint8)  # 2 groups of 2 codes: 1 + 2 bytes
    assert ops.unpack(packed, widths, 1, 2).shape == (2, 2)
    with pytest.raises(TypeError, match="packed must be uint8"):
        ops.unpack(packed.to(torch.int32), widths, 1, 2)
    with pytest.raises(ValueError, match="packed must be 1-D"):
        ops.unpack(packed.reshape(1, 3), widths, 1, 2)
    with pytest.raises(ValueError, match="packed must hold 3 bytes"):
        ops.unpack(torch.zeros(4, dtype=torch.uint8), widths, 1, 2)
    with pytest.raises(ValueError, match="row_len must be >= 0"):
        ops.unpack(packed, widths, 1, -2)
    with pytest.raises(TypeError, match="rows_per_group must be an int"):
        ops.unpack(packed, widths, 1.0, 2)
    with pytest.raises(ValueError, match="widths must be in"):
        ops.unpack(packed, torch.tensor([3, 40]), 1, 2)
    with pytest.raises(ValueError, match="group_len must be >= 0"):
        ops.packed_group_offsets(widths, -1)


@pytest.mark.skipif(not _native.available(), reason="checks the C++ kernel's own argument checks")
def test_cpp_kernels_check_their_arguments_too():
    # Called without the Python wrapper, the op still refuses bad input, naming it. A wrong dtype is a
    # ValueError there: across the stable ABI no C++ exception becomes TypeError (csrc/stable.h).
    with pytest.raises(ValueError, match="widths must be in \\[0, 32\\], got 40 at group 1"):
        torch.ops.sgsc.pack(torch.zeros(4, dtype=torch.int32), torch.tensor([3, 40]))
    with pytest.raises(ValueError, match="packed must hold 3 bytes"):
        torch.ops.sgsc.unpack(torch.zeros(5, dtype=torch.uint8), torch.tensor([3, 5]), 1, 2)
    with pytest.raises(ValueError, match="ints must be int32"):
        torch.ops.sgsc.pack(torch.zeros(4), torch.tensor([3]))


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "cpu"])
def test_triton_launchers_guard_against_bad_widths(impl):
    # The public functions check widths first; the launchers must stay safe when called directly
    # (or under torch.compile, where those value checks are skipped).
    with pytest.raises(ValueError, match="widths must be in \\[0, 32\\], got 40 at group 1"):
        run_pack(impl, torch.zeros(4, dtype=torch.int32), torch.tensor([3, 40], dtype=torch.int32))
    if impl == "triton-interpret":
        packed = torch.full((3,), 0xFF, dtype=torch.uint8)
        out = _kernels().unpack(packed, torch.tensor([-8, 40], dtype=torch.int32), 1, 2)  # no read outside
        assert out.shape == (2, 2)


# ---- every implementation writes the same bytes -----------------------------------------------


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "cpu"])
@pytest.mark.parametrize(
    ("shape", "widths"),
    [
        ((33, 5), list(range(33))),  # every width, 5 codes per group
        ((5, 3, 7), [3, 5, 7, 13, 31]),
        ((2, 1100), [1, 32]),  # more than one block of codes per group
        ((3, 1031), [3, 0, 13]),  # odd length across blocks
        ((33, 2053), list(range(33))),  # every width over three blocks with a ragged last one
        ((1,), [7]),
        ((3, 0), [3, 5, 7]),  # empty
        ((0, 4), [9]),
    ],
)
def test_triton_matches_cpu(impl, shape, widths):
    widths = torch.tensor(widths, dtype=torch.int32)
    ints = random_codes(shape, widths, seed=shape[0])
    packed = ops.pack(ints, widths)
    assert torch.equal(run_pack(impl, ints, widths), packed)
    rows_per_group, row_len = shape[0] // widths.numel(), ints[0].numel() if shape[0] else shape[1]
    assert torch.equal(run_unpack(impl, packed, widths, rows_per_group, row_len).reshape(shape), ints)


@needs_triton
def test_triton_launch_config_keeps_blocks_on_byte_boundaries():
    kernels = _kernels()
    for group_len in (0, 1, 7, 8, 100, 1024, 1025, 10**6):
        cfg = kernels.launch_config(group_len)
        assert cfg.block_codes % 8 == 0
        assert cfg.blocks_per_group * cfg.block_codes >= group_len


# ---- torch.library -----------------------------------------------------------------------------


def _opcheck_devices():
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


@pytest.mark.parametrize("device", _opcheck_devices())
def test_opcheck(device):
    widths = torch.tensor([3, 0, 13, 32], dtype=torch.int32, device=device)
    ints = random_codes((8, 5), widths.cpu()).to(device)
    packed = ops.pack(ints, widths)
    torch.library.opcheck(torch.ops.sgsc.pack.default, (ints, widths))
    torch.library.opcheck(torch.ops.sgsc.unpack.default, (packed, widths, 2, 5))
    out = torch.empty((8, 5), dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.sgsc.unpack_out.default, (packed, widths, 2, 5, out))


def test_reference_stands_in_without_the_cpp_extension():
    # A fresh interpreter in which sgsc._C cannot be imported: the CPU ops run on the reference.
    script = textwrap.dedent(
        f"""
        import sys, warnings
        sys.modules["sgsc._C"] = None  # makes `import sgsc._C` fail
        warnings.simplefilter("ignore")
        import torch
        from sgsc import ops
        from sgsc.ops import native as _native
        assert not _native.available()
        widths = torch.tensor({EXAMPLE_WIDTHS}, dtype=torch.int32)
        ints = torch.tensor({EXAMPLE_INTS}, dtype=torch.int32)
        packed = ops.pack(ints, widths)
        assert packed.tolist() == {EXAMPLE_BYTES}, packed
        assert ops.unpack(packed, widths, 1, 2).tolist() == {EXAMPLE_INTS}
        out = torch.zeros(3, 2, dtype=torch.int32)
        assert ops.unpack(packed, widths, 1, 2, out=out).tolist() == {EXAMPLE_INTS}
        try:
            ops.pack(ints * 9, widths)
        except ValueError as exc:
            assert "group 0" in str(exc), exc
        else:
            raise AssertionError("no ValueError")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_torch_compile_fullgraph_traces_pack_and_unpack():
    widths = torch.tensor(EXAMPLE_WIDTHS, dtype=torch.int32)
    ints = torch.tensor(EXAMPLE_INTS, dtype=torch.int32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def round_trip(ints, widths):
        packed = ops.pack(ints, widths)  # data-dependent size: the fake kernel's dynamic size
        return packed, ops.unpack(packed, widths, 1, 2)

    packed, back = round_trip(ints, widths)
    assert packed.tolist() == EXAMPLE_BYTES
    assert torch.equal(back, ints)
