"""Pure-PyTorch twins of every sgsc kernel.

They are the test oracle, the baseline in every benchmark and the fallback where a compiled
backend is missing. They are written for clarity, not speed, and differentiate with plain
autograd, so the straight-through estimator here is independent of the hand-written backward
kernels it checks.
"""

from __future__ import annotations

import torch

ROUNDING_MODES = ("nearest", "floor")


def group_params(b: torch.Tensor, e: torch.Tensor):
    """Per-group constants of eq. (1): the scale ``2^-e``, its inverse ``2^e`` and the clamp range.

    The three powers of two come from one ``exp2`` over a ``(3, G)`` stack; the C++ kernels make
    the same call on the same layout, so forward outputs agree bit for bit.
    """
    bits = torch.clamp(b, min=0)
    scale, inv_scale, half = torch.exp2(torch.stack([-e, e, bits - 1]))
    return scale, inv_scale, -half, half - 1, bits


def fake_quantize(w: torch.Tensor, b: torch.Tensor, e: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """``q = 2^e * round(clamp(2^-e * w, -2^(b-1), 2^(b-1) - 1))`` per group of rows, with STE.

    Computed in float32 (or float64 when ``w`` is float64, for gradient checks) and returned in
    ``w.dtype``. Groups with ``b <= 0`` are pruned: ``q == 0`` and no gradient flows.
    """
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    groups = b.shape[0]
    compute_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    rows = w.to(compute_dtype).reshape(groups, -1)
    scale, inv_scale, lo, hi, bits = (t.to(compute_dtype).unsqueeze(1) for t in group_params(b, e))
    scaled = rows * scale
    clamped = torch.clamp(scaled, lo, hi)
    rounded = torch.floor(clamped) if rounding == "floor" else torch.round(clamped)
    straight_through = clamped + (rounded - clamped).detach()
    q = straight_through * inv_scale
    q = torch.where(bits > 0, q, torch.zeros_like(q))
    return q.reshape(w.shape).to(w.dtype)
