"""sgsc::nonzero_select / sgsc::nonzero_expand, the sparse groups' kernels: C++ against the NumPy reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgsc.ops import native as _native
from sgsc.ops import reference

# The C++ op reports a wrong dtype as ValueError: across the stable ABI no C++ exception becomes TypeError.
REGISTERED_TYPE_ERROR = ValueError if _native.available() else TypeError

IMPLS = {
    "registered": (torch.ops.sgsc.nonzero_select, torch.ops.sgsc.nonzero_expand),
    "reference": (reference.nonzero_select, reference.nonzero_expand),
}


def _sparse_codes(groups: int, group_len: int, zeros: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-(2**31), 2**31 - 1, (groups, group_len), generator=generator, dtype=torch.int64)
    return codes.masked_fill(torch.rand(groups, group_len, generator=generator) < zeros, 0).to(torch.int32)


def _masks(codes: torch.Tensor) -> torch.Tensor:
    """Little-endian bitmasks of the nonzero codes, built independently of the ops under test."""
    masks = np.zeros((codes.shape[0], (codes.shape[1] + 7) // 8), dtype=np.uint8)
    for row, col in (codes != 0).nonzero().tolist():
        masks[row, col // 8] |= 1 << (col % 8)
    return torch.from_numpy(masks)


def test_worked_example():
    codes = torch.tensor([[0, 5, 0, 0, 0, 0, 0, 0, 0, -7], [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    for select, expand in IMPLS.values():
        assert select(codes, torch.tensor([1, 0])).tolist() == [3, 5, -7]  # rows in the order asked
        masks = torch.tensor([[0x02, 0x02], [0x01, 0x00]], dtype=torch.uint8)  # bit 9 = byte 1, bit 1
        assert torch.equal(expand(masks, torch.tensor([5, -7, 3], dtype=torch.int32), 10), codes)


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(0, 7), group_len=st.integers(0, 140), zeros=st.floats(0.0, 1.0), seed=st.integers(0, 2**31),
       picks=st.lists(st.integers(0, 6), max_size=9))
def test_select_then_expand_round_trips_and_matches_the_reference(groups, group_len, zeros, seed, picks):
    codes = _sparse_codes(groups, group_len, zeros, seed)
    rows = torch.tensor([p for p in picks if p < groups], dtype=torch.int64)  # any order, repeats allowed
    values = torch.ops.sgsc.nonzero_select(codes, rows)
    assert torch.equal(values, reference.nonzero_select(codes, rows))
    assert values.tolist() == [v for r in rows.tolist() for v in codes[r].tolist() if v != 0]
    masks = _masks(codes[rows])
    expanded = torch.ops.sgsc.nonzero_expand(masks, values, group_len)
    assert torch.equal(expanded, codes[rows]) and torch.equal(expanded, reference.nonzero_expand(masks, values, group_len))


def test_many_rows_on_every_thread_match_the_reference():
    codes = _sparse_codes(600, 4099, 0.6, 1)  # rows of a length that is not a multiple of 8 or 64
    rows = torch.randperm(600, generator=torch.Generator().manual_seed(2))
    values = torch.ops.sgsc.nonzero_select(codes, rows)
    assert torch.equal(values, reference.nonzero_select(codes, rows))
    masks = torch.from_numpy(np.packbits((codes[rows] != 0).numpy(), axis=1, bitorder="little"))
    assert torch.equal(torch.ops.sgsc.nonzero_expand(masks, values, 4099), codes[rows])


def test_non_contiguous_inputs():
    codes = _sparse_codes(5, 24, 0.5, 3)
    rows = torch.tensor([4, 0, 2, 1], dtype=torch.int64)
    strided_codes = torch.zeros(5, 48, dtype=torch.int32)[:, ::2]
    strided_codes.copy_(codes)
    assert torch.equal(torch.ops.sgsc.nonzero_select(strided_codes, rows[::2]), reference.nonzero_select(codes, rows[::2]))
    masks = _masks(codes)
    values = reference.nonzero_select(codes, torch.arange(5))
    wide = torch.zeros(5, 6, dtype=torch.uint8)[:, ::2]
    wide.copy_(masks)
    strided_values = torch.zeros(2 * values.numel(), dtype=torch.int32)[::2]
    strided_values.copy_(values)
    assert torch.equal(torch.ops.sgsc.nonzero_expand(wide, strided_values, 24), codes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "codes, rows, error, match",
    [
        (torch.zeros(2, 3, dtype=torch.int64), torch.tensor([0]), TypeError, "codes must be int32"),
        (torch.zeros(6, dtype=torch.int32), torch.tensor([0]), ValueError, "codes must be 2-D"),
        (torch.zeros(2, 3, dtype=torch.int32), torch.tensor([0], dtype=torch.int32), TypeError, "rows must be int64"),
        (torch.zeros(2, 3, dtype=torch.int32), torch.tensor([[0]]), ValueError, "rows must be 1-D"),
        (torch.zeros(2, 3, dtype=torch.int32), torch.tensor([0, 2]), IndexError, r"rows\[1\] = 2 is not a row"),
        (torch.zeros(2, 3, dtype=torch.int32), torch.tensor([-1]), IndexError, r"rows\[0\] = -1 is not a row"),
    ],
)
def test_select_names_the_bad_argument(impl, codes, rows, error, match):
    if impl == "registered" and error is TypeError:
        error = REGISTERED_TYPE_ERROR
    with pytest.raises(error, match=match):
        IMPLS[impl][0](codes, rows)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "masks, values, group_len, error, match",
    [
        (torch.zeros(1, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 10, TypeError, "masks must be uint8"),
        (torch.zeros(1, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), 10, TypeError, "values must be int32"),
        (torch.zeros(1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32), 10, ValueError, "= 2 bytes per row"),
        (torch.zeros(2, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32), 10, ValueError, "masks must be 2-D"),
        (torch.zeros(1, 2, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.int32), 10, ValueError, "values must be 1-D"),
        (torch.zeros(1, 0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32), -1, ValueError, "group_len must be >= 0"),
        # bit 10 of a 10-code row: past its last code
        (torch.tensor([[0x00, 0x04]], dtype=torch.uint8), torch.ones(1, dtype=torch.int32), 10, ValueError,
         "row 0 of masks has bits set past its 10 codes"),
        (torch.tensor([[0x03, 0x00]], dtype=torch.uint8), torch.ones(3, dtype=torch.int32), 10, ValueError,
         "masks have 2 bits set, values has 3 codes"),
        (torch.tensor([[0x03, 0x00]], dtype=torch.uint8), torch.ones(1, dtype=torch.int32), 10, ValueError,
         "masks have 2 bits set, values has 1 codes"),
    ],
)
def test_expand_names_the_bad_argument(impl, masks, values, group_len, error, match):
    if impl == "registered" and error is TypeError:
        error = REGISTERED_TYPE_ERROR
    with pytest.raises(error, match=match):
        IMPLS[impl][1](masks, values, group_len)


def test_opcheck():
    codes = _sparse_codes(4, 19, 0.5, 4)
    rows = torch.tensor([3, 1], dtype=torch.int64)
    torch.library.opcheck(torch.ops.sgsc.nonzero_select.default, (codes, rows))
    values = reference.nonzero_select(codes, rows)
    torch.library.opcheck(torch.ops.sgsc.nonzero_expand.default, (_masks(codes[rows]), values, 19))


def test_reference_stands_in_without_the_cpp_extension():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["sgsc._C"] = None  # makes `import sgsc._C` fail
        warnings.simplefilter("ignore")
        import torch
        from sgsc.ops import native as _native
        from sgsc.export import codec
        assert not _native.available()
        codes = torch.zeros(4, 64, dtype=torch.int32)
        codes[0, 3], codes[1, 60], codes[3] = 5, -2, -1  # width 1 holds -1 and 0
        stream, width_bytes = codec.encode(codes, torch.tensor([4, 2, 0, 1]))
        assert (width_bytes >= 0x80).sum() == 2, width_bytes  # groups 0 and 1 are stored sparse
        assert torch.equal(codec.decode(stream, width_bytes, 1, 64), codes)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
