"""Integer codes and scales for the packed runtime's tests, built independently of its layout."""

from __future__ import annotations

import torch


def random_layer(out_features, in_features, widths, group_by, seed):
    """Codes ``(O, I)`` with group ``g`` spanning exactly ``widths[g]`` bits, and power-of-two scales."""
    gen = torch.Generator().manual_seed(seed)
    groups = len(widths)
    rows = out_features // groups if group_by == "output" else out_features
    cols = in_features if group_by == "output" else in_features // groups
    blocks = []
    for w in widths:
        if w == 0:
            block = torch.zeros(rows, cols, dtype=torch.int64)
        else:
            block = torch.randint(-(2 ** (w - 1)), 2 ** (w - 1), (rows, cols), generator=gen, dtype=torch.int64)
            block.view(-1)[0] = -(2 ** (w - 1))  # the width is needed exactly
        blocks.append(block)
    codes = torch.cat(blocks, dim=0 if group_by == "output" else 1)
    scales = torch.exp2(torch.randint(-12, 3, (groups,), generator=gen).float())
    return codes, scales


def dense_weight(codes, scales, group_by):
    """The dequantized weight in float64, built independently of the layout."""
    if group_by == "output":
        return codes.double() * scales.double().repeat_interleave(codes.shape[0] // scales.numel()).unsqueeze(1)
    return codes.double() * scales.double().repeat_interleave(codes.shape[1] // scales.numel()).unsqueeze(0)
