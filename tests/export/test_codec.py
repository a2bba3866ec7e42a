"""A layer's codes as bytes: sparse groups where they are smaller, exact round trips, and damage detected."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgsc.export import codec


def _worked_example():
    codes = torch.zeros(3, 16, dtype=torch.int64)
    codes[0, 2], codes[0, 13] = 3, -4
    codes[1, 0] = -1
    codes[2] = 1
    return codes, torch.tensor([3, 2, 2])


def test_worked_example_bytes():
    """The example of docs/FORMAT.md: dense run, sparse masks, then one run of nonzero codes per width."""
    stream, width_bytes = codec.encode(*_worked_example())
    # group 0 (w=3, 2 of 16 nonzero): dense 6 bytes, sparse 2 + 1; group 1 (w=2, 1 nonzero): dense 4,
    # sparse 2 + 1; group 2 (w=2, all nonzero): dense 4, sparse 2 + 4
    assert width_bytes.tolist() == [0x83, 0x82, 0x02]
    assert stream.tolist() == [
        0x55, 0x55, 0x55, 0x55,  # group 2, dense: sixteen 1s at 2 bits (01 each)
        0x04, 0x20, 0x01, 0x00,  # masks: group 0 (bits 2 and 13), group 1 (bit 0)
        0x03,  # the width-2 run: group 1's -1 -> 11
        0x23,  # the width-3 run: group 0's 3 -> 011, -4 -> 100, LSB first: 0b00_100_011
    ]
    assert torch.equal(codec.decode(stream, width_bytes, 1, 16), _worked_example()[0].int())


@st.composite
def _layer(draw):
    groups, group_len = draw(st.integers(1, 6)), draw(st.integers(0, 40))
    widths = torch.tensor(draw(st.lists(st.integers(0, 32), min_size=groups, max_size=groups)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    rows = []
    for w in widths.tolist():
        low, high = (-(2 ** (w - 1)), 2 ** (w - 1) - 1) if w else (0, 0)
        values = torch.randint(low, high + 1, (group_len,), generator=generator, dtype=torch.int64)
        keep = torch.rand(group_len, generator=generator) < draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
        rows.append(torch.where(keep, values, torch.zeros_like(values)))
    return torch.stack(rows), widths


@settings(max_examples=150, deadline=None)
@given(_layer(), st.sampled_from([1, 2]))
def test_round_trip_is_exact_and_each_group_takes_the_smaller_form(layer, rows_per_group):
    codes, widths = layer
    groups, group_len = codes.shape
    if group_len % rows_per_group:
        rows_per_group = 1
    stream, width_bytes = codec.encode(codes, widths)
    nonzero = (codes != 0).sum(1)
    dense = (widths * group_len + 7) // 8
    sparse = (group_len + 7) // 8 + (widths * nonzero + 7) // 8
    expect_sparse = (nonzero > 0) & (sparse < dense)
    assert torch.equal(width_bytes.to(torch.int64) & codec.SPARSE_FLAG != 0, expect_sparse)
    assert torch.equal(width_bytes.to(torch.int64) & codec.WIDTH_BITS, widths)
    # one run of nonzero codes per width packs tighter than a byte-aligned run per sparse group
    assert stream.numel() <= int(torch.where(expect_sparse, sparse, dense).sum())
    padded = torch.cat([torch.full((3,), 0xAB, dtype=torch.uint8), stream, torch.full((2,), 0xCD, dtype=torch.uint8)])
    assert codec.stream_length(padded, 3, width_bytes, group_len) == stream.numel()
    decoded = codec.decode(stream, width_bytes, rows_per_group, group_len // rows_per_group)
    assert decoded.dtype == torch.int32 and decoded.shape == (groups * rows_per_group, group_len // rows_per_group)
    assert torch.equal(decoded.reshape(groups, group_len), codes.int())


@pytest.mark.parametrize("byte", [0x80, 0x40 | 3, 33, 0x80 | 33, 0xFF])
def test_width_bytes_no_encoder_writes_are_rejected(byte):
    width_bytes = torch.tensor([2, byte], dtype=torch.uint8)
    with pytest.raises(codec.CodecError, match=f"width byte {byte} of group 1 is not a width 0..32"):
        codec.check_width_bytes(width_bytes)


def test_sparse_flags_can_be_refused():
    codec.check_width_bytes(torch.tensor([0, 32, 0x81, 0xA0], dtype=torch.uint8))
    with pytest.raises(codec.CodecError, match="width byte 129 of group 0"):
        codec.check_width_bytes(torch.tensor([0x81], dtype=torch.uint8), sparse_allowed=False)


def _damaged(index, value):
    stream, width_bytes = codec.encode(*_worked_example())
    stream = stream.clone()
    stream[index] = value
    return stream, width_bytes


def test_a_mask_bit_past_the_last_code_is_rejected():
    codes, widths = _worked_example()
    codes, widths = codes[:1, :12], widths[:1]  # 12 codes: the mask's second byte has 4 unused bits
    stream, width_bytes = codec.encode(codes, widths)
    assert width_bytes.tolist() == [0x83]
    stream = stream.clone()
    stream[1] |= 0x80
    with pytest.raises(codec.CodecError, match="bits set past the group's last code"):
        codec.decode(stream, width_bytes, 1, 12)


def test_a_mask_claiming_more_codes_than_stored_is_rejected():
    stream, width_bytes = _damaged(4, 0xFF)  # nine width-3 codes where one byte holds two
    with pytest.raises(codec.CodecError, match="codes run past the end of the stream"):
        codec.stream_length(stream, 0, width_bytes, 16)
    with pytest.raises(codec.CodecError, match="codes run past the end of the stream"):
        codec.decode(stream, width_bytes, 1, 16)


def test_a_zero_among_the_nonzero_codes_is_rejected():
    stream, width_bytes = _damaged(9, 0x18)  # codes 0 and 3: a zero where only nonzero codes belong
    with pytest.raises(codec.CodecError, match="width-3 run of sparse codes holds a zero"):
        codec.decode(stream, width_bytes, 1, 16)


def test_a_sparse_group_without_a_nonzero_code_is_rejected():
    stream, width_bytes = _damaged(6, 0x00)  # group 1's mask emptied
    with pytest.raises(codec.CodecError, match="mask has no bit set"):
        codec.decode(stream, width_bytes, 1, 16)


def test_a_truncated_stream_is_rejected():
    stream, width_bytes = codec.encode(*_worked_example())
    with pytest.raises(codec.CodecError, match="masks run past the end of the stream"):
        codec.stream_length(stream[:5], 0, width_bytes, 16)
    with pytest.raises(codec.CodecError, match="dense groups need 4 bytes"):
        codec.stream_length(stream[:3], 0, width_bytes, 16)
    with pytest.raises(ValueError):
        codec.decode(stream[:-1], width_bytes, 1, 16)
