"""The data order: the batch of step ``s`` is a pure function of ``(seed, s, rank)``.

So the step counter is the whole data-order state, and a resumed run sees the batches its
uninterrupted twin would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints through NumPy's SeedSequence hashing."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator().manual_seed(seed)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Training examples of ``step`` on ``rank``: epoch-wise seeded permutations, cut in batches.

    A pure function of its arguments, which is what makes resuming exact.
    """
    per_epoch = n // (batch_size * world)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=seeded_generator(seed, epoch))
    start = (position * world + rank) * batch_size
    return order[start : start + batch_size]


def subset(data: TensorDataset, indices: list[int]) -> TensorDataset | None:
    return TensorDataset(*(t[indices] for t in data.tensors)) if indices else None


def batch(data: TensorDataset, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.tensors
    return x[index].to(device), y[index].to(device)
