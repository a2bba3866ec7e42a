"""Pure-PyTorch twins of every sgsc kernel.

They are the test oracle, the baseline in every benchmark and the fallback where a compiled
backend is missing. They are written for clarity, not speed, and differentiate with plain
autograd, so the straight-through estimator here is independent of the hand-written backward
kernels it checks.
"""

from __future__ import annotations

import torch

from sgsc.ops.spec import MAX_WIDTH, Q8_BLOCK, ROUNDING_MODES, stream_bytes


def group_params(b: torch.Tensor, e: torch.Tensor):
    """Per-group constants of eq. (1): the scale ``2^-e``, its inverse ``2^e`` and the clamp range.

    The three powers of two come from one ``exp2`` over a ``(3, G)`` stack; the C++ kernels make
    the same call on the same layout, so forward outputs agree bit for bit.
    """
    bits = torch.clamp(b, min=0)
    scale, inv_scale, half = torch.exp2(torch.stack([-e, e, bits - 1]))
    return scale, inv_scale, -half, half - 1, bits


def _eq1(rows: torch.Tensor, b: torch.Tensor, e: torch.Tensor, rounding: str):
    """Eq. (1) on ``(G, L)`` rows: ``(clamped, rounded, 2^e, bits)``, each per-group value as a ``(G, 1)`` column.

    ``rounded`` is the integer code of every weight (as a float); ``rounded * 2^e`` is the quantized
    weight where ``bits > 0``. The single source of the codes: :func:`fake_quantize` and the exporter's
    :func:`integer_codes` both call it.
    """
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    scale, inv_scale, lo, hi, bits = (t.to(rows.dtype).unsqueeze(1) for t in group_params(b, e))
    clamped = torch.clamp(rows * scale, lo, hi)
    rounded = torch.floor(clamped) if rounding == "floor" else torch.round(clamped)
    return clamped, rounded, inv_scale, bits


def fake_quantize(w: torch.Tensor, b: torch.Tensor, e: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """``q = 2^e * round(clamp(2^-e * w, -2^(b-1), 2^(b-1) - 1))`` per group of rows, with STE.

    Computed in float32 (or float64 when ``w`` is float64, for gradient checks) and returned in
    ``w.dtype``. Groups with ``b <= 0`` are pruned: ``q == 0`` and no gradient flows.
    """
    compute_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    rows = w.to(compute_dtype).reshape(b.shape[0], -1)
    clamped, rounded, inv_scale, bits = _eq1(rows, b, e, rounding)
    straight_through = clamped + (rounded - clamped).detach()
    q = straight_through * inv_scale
    q = torch.where(bits > 0, q, torch.zeros_like(q))
    return q.reshape(w.shape).to(w.dtype)


@torch.no_grad()
def integer_codes(rows: torch.Tensor, b: torch.Tensor, e: torch.Tensor, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes of eq. (1) for ``(G, L)`` float32 ``rows`` and the per-group scales ``2^e``.

    Int64 codes ``(G, L)``, zero in pruned groups (``b <= 0``), and float32 scales ``(G,)``: ``codes *
    scale`` is :func:`fake_quantize`'s output bit for bit. Non-finite codes are a ``ValueError``.
    """
    _, rounded, inv_scale, bits = _eq1(rows.float(), b.float(), e.float(), rounding)
    if not torch.isfinite(rounded).all():
        raise ValueError("weights or quantizer parameters are not finite")
    rounded = torch.where(bits > 0, rounded, torch.zeros_like(rounded))
    return rounded.to(torch.int64), inv_scale.squeeze(1)


# ---- bit packing: the layout of sgsc.ops.pack, written bit by bit with NumPy ----------
#
# Group g's codes are written as a stream of bits: code i fills bits [i*w, (i+1)*w) with the low w
# bits of its two's complement, least significant bit first, and bit k of the stream is bit k % 8
# of the group's byte k // 8. Each group's stream starts on a byte boundary, right after the last
# byte of the previous group; the unused high bits of a group's last byte are zero. Width 0 stores
# nothing (the group is pruned) and unpacks to zeros. See sgsc.ops.functional.pack for a worked example.


def code_range(width: int) -> tuple[int, int]:
    """The codes a group of ``width`` bits can hold: ``[-2^(w-1), 2^(w-1) - 1]``, and ``[0, 0]`` for 0."""
    if width == 0:
        return 0, 0
    return -(1 << (width - 1)), (1 << (width - 1)) - 1


def out_of_range_message(group: int, width: int, index: int, code: int) -> str:
    """The ``ValueError`` text every pack implementation raises for a code its group cannot hold."""
    lo, hi = code_range(width)
    return (
        f"sgsc.pack: group {group} (width {width}) holds code {code} at position {index}, "
        f"outside the range [{lo}, {hi}] of its width"
    )


def _group_widths(widths: torch.Tensor) -> list[int]:
    values = [int(v) for v in widths.reshape(-1).tolist()]
    for g, v in enumerate(values):
        if not 0 <= v <= MAX_WIDTH:
            raise ValueError(f"widths must be in [0, {MAX_WIDTH}], got {v} at group {g}")
    return values


def pack(ints: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Pack int32 codes, grouped along dim 0 into ``widths.numel()`` groups, into a uint8 stream.

    Group ``g`` is the contiguous run of ``L = ints.numel() / G`` codes that holds its rows. Returns
    a 1-D uint8 tensor of ``sum_g ceil(widths[g] * L / 8)`` bytes on the CPU. A code outside its
    group's range is a ``ValueError`` naming the group.
    """
    import numpy as np

    width_list = _group_widths(widths)
    codes = ints.detach().to("cpu", torch.int64).reshape(len(width_list), -1).numpy()
    streams = []
    for g, w in enumerate(width_list):
        row = codes[g]
        lo, hi = code_range(w)
        bad = np.flatnonzero((row < lo) | (row > hi))
        if bad.size:
            raise ValueError(out_of_range_message(g, w, int(bad[0]), int(row[bad[0]])))
        if w == 0:
            continue
        low_bits = row & ((1 << w) - 1)  # the two's complement of each code, cut to w bits
        bits = np.empty((row.size, w), dtype=np.uint8)
        for k in range(w):
            bits[:, k] = (low_bits >> k) & 1  # bits[i, k] is bit i*w + k of the group's stream
        streams.append(np.packbits(bits.reshape(-1), bitorder="little"))  # pads the last byte with 0
    if not streams:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.from_numpy(np.concatenate(streams))


def unpack(packed: torch.Tensor, widths: torch.Tensor, rows_per_group: int, row_len: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 codes of shape ``(G * rows_per_group, row_len)`` on the CPU."""
    import numpy as np

    width_list = _group_widths(widths)
    group_len = rows_per_group * row_len
    stream = packed.detach().to("cpu").numpy()
    expected = sum(stream_bytes(w, group_len) for w in width_list)
    if stream.size != expected:
        raise ValueError(f"packed must hold {expected} bytes for these widths and shape, got {stream.size}")
    out = np.zeros((len(width_list), group_len), dtype=np.int64)
    start = 0
    for g, w in enumerate(width_list):
        if w == 0:
            continue
        size = stream_bytes(w, group_len)
        bits = np.unpackbits(stream[start : start + size], bitorder="little")[: w * group_len]
        bits = bits.reshape(group_len, w).astype(np.int64)
        value = (bits << np.arange(w, dtype=np.int64)).sum(axis=1)  # the w-bit field, unsigned
        out[g] = np.where(value >= 1 << (w - 1), value - (1 << w), value)  # back to two's complement
        start += size
    return torch.from_numpy(out.astype(np.int32)).reshape(len(width_list) * rows_per_group, row_len)


def _mask_bytes(group_len: int) -> int:
    return stream_bytes(1, group_len)  # one bit per code


def nonzero_select(codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The nonzero codes of ``codes[rows[0]]``, then of ``codes[rows[1]]``, ..., each in position order (int32, CPU)."""
    if codes.dtype != torch.int32:
        raise TypeError(f"sgsc.nonzero_select: codes must be int32, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"sgsc.nonzero_select: codes must be 2-D (groups, codes per group), got shape {tuple(codes.shape)}")
    if rows.dtype != torch.int64:
        raise TypeError(f"sgsc.nonzero_select: rows must be int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"sgsc.nonzero_select: rows must be 1-D, got shape {tuple(rows.shape)}")
    row_ids = rows.detach().cpu().numpy()
    outside = (row_ids < 0) | (row_ids >= codes.shape[0])
    if outside.any():
        r = int(outside.nonzero()[0][0])
        raise IndexError(f"sgsc.nonzero_select: rows[{r}] = {row_ids[r]} is not a row of codes ({codes.shape[0]} rows)")
    picked = codes.detach().cpu().numpy()[row_ids]
    return torch.from_numpy(picked[picked != 0])  # a boolean mask selects in row-major order


def nonzero_expand(masks: torch.Tensor, values: torch.Tensor, group_len: int) -> torch.Tensor:
    """Rows of ``group_len`` int32 codes: ``values`` in order at the set bits of each row's little-endian
    bitmask (``masks``, ``(R, ceil(group_len / 8))`` uint8), zero elsewhere (CPU)."""
    import numpy as np

    if masks.dtype != torch.uint8:
        raise TypeError(f"sgsc.nonzero_expand: masks must be uint8, got {masks.dtype}")
    if values.dtype != torch.int32:
        raise TypeError(f"sgsc.nonzero_expand: values must be int32, got {values.dtype}")
    if group_len < 0:
        raise ValueError(f"sgsc.nonzero_expand: group_len must be >= 0, got {group_len}")
    if masks.dim() != 2 or masks.shape[1] != _mask_bytes(group_len):
        raise ValueError(f"sgsc.nonzero_expand: masks must be 2-D with ceil(group_len / 8) = {_mask_bytes(group_len)} "
                         f"bytes per row, got shape {tuple(masks.shape)}")
    if values.dim() != 1:
        raise ValueError(f"sgsc.nonzero_expand: values must be 1-D, got shape {tuple(values.shape)}")
    bits = np.unpackbits(masks.detach().cpu().numpy(), axis=1, bitorder="little").astype(bool)
    past_end = bits[:, group_len:].any(axis=1)
    if past_end.any():
        raise ValueError(f"sgsc.nonzero_expand: row {int(past_end.nonzero()[0][0])} of masks has bits set past its "
                         f"{group_len} codes")
    bits = bits[:, :group_len]
    if int(bits.sum()) != values.numel():
        raise ValueError(f"sgsc.nonzero_expand: masks have {int(bits.sum())} bits set, values has {values.numel()} codes")
    out = np.zeros(bits.shape, dtype=np.int32)
    out[bits] = values.detach().cpu().numpy()  # fills in row-major order, as nonzero_select reads
    return torch.from_numpy(out)


# ---- packed runtime: the layout of sgsc.ops.packed, read back with plain tensor ops ---------------
#
# Each tile's segment holds, for its 8 lanes, ceil(len / PER) words of PER = 32 // W codes (one raw
# int32 code for W > 16); slot j of a word is bits [j * 32 // PER, ...) holding code + 2^(W-1).
# Weights are code * seg_scale * row_scale; rows no tile names, and columns no segment covers, are 0.


def packed_dequantize(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features: int,
                      in_features: int) -> torch.Tensor:
    """The float32 ``(out_features, in_features)`` weight a :class:`sgsc.ops.PackedWeight` holds, on its device."""
    out = torch.zeros(out_features, in_features, dtype=torch.float32, device=words.device)
    segments = seg_table.tolist()
    ptr = tile_ptr.tolist()
    for t in range(rows.shape[0]):
        lanes = rows[t].long()
        kept = lanes >= 0
        for seg, offset in tile_table[ptr[t]:ptr[t + 1]].tolist():
            k0, k1, width = segments[seg]
            per = 32 // width if width <= 16 else 1
            n_words = -(-(k1 - k0) // per)
            block = words[offset:offset + 8 * n_words].reshape(n_words, 8).to(torch.int64) & 0xFFFFFFFF
            if per == 1:
                codes = torch.where(block >= 2**31, block - 2**32, block)
            else:
                shifts = torch.arange(per, device=words.device) * (32 // per)
                fields = (block.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << (32 // per)) - 1)
                codes = fields.reshape(n_words * per, 8) - 2 ** (width - 1)
            values = codes[: k1 - k0].T.to(torch.float32) * (seg_scale[seg] * row_scale[t]).unsqueeze(1)
            out[lanes[kept], k0:k1] = values[kept]
    return out


def packed_linear(x, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features: int,
                  bias=None) -> torch.Tensor:
    """``F.linear(x, packed_dequantize(...), bias)`` for 2-D float32 ``x``."""
    weight = packed_dequantize(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                               x.shape[1])
    return torch.nn.functional.linear(x, weight, bias)


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x_hat``: 2-D float32 ``x`` quantized to int8 per row in blocks of ``block`` columns and back.

    Per block: ``s = absmax / 127``, ``q = round_half_even(x * (127 / absmax))`` in ``[-127, 127]``,
    ``x_hat = q * s`` in float32; an all-zero block stays zero, a block with a non-finite value is NaN."""
    rows, cols = x.shape
    pad = -cols % block
    blocks = torch.nn.functional.pad(x, (0, pad)).reshape(rows, -1, block)
    absmax = blocks.abs().amax(dim=2, keepdim=True)
    finite = torch.isfinite(blocks).all(dim=2, keepdim=True)
    safe = torch.where(finite & (absmax > 0), absmax, torch.ones(()))
    q = torch.round(blocks * (127.0 / safe)).clamp(-127, 127)
    scale = torch.where(finite, torch.where(absmax > 0, absmax / 127.0, torch.zeros(())), torch.full((), float("nan")))
    return (q * scale).reshape(rows, -1)[:, :cols]


def quantize_segments(x: torch.Tensor, seg_table: torch.Tensor) -> torch.Tensor:
    """2-D ``x`` with each segment's column range ``[k0, k1)`` quantized by :func:`quantize_activations`
    in blocks of ``Q8_BLOCK`` counted from ``k0`` (the ranges of a layout are equal or disjoint)."""
    x_hat = x.clone()
    for k0, k1 in sorted({(int(k0), int(k1)) for k0, k1, _ in seg_table.tolist()}):
        x_hat[:, k0:k1] = quantize_activations(x[:, k0:k1], Q8_BLOCK)
    return x_hat


def packed_linear_q8(x, words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features: int,
                     bias=None) -> torch.Tensor:
    """``F.linear(x_hat, packed_dequantize(...), bias)``: ``x`` quantized per block of ``Q8_BLOCK`` columns
    counted from the start of each segment's column range (:func:`quantize_activations`)."""
    return packed_linear(quantize_segments(x, seg_table), words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features, bias)
