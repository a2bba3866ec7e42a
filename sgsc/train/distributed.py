"""DistributedDataParallel under ``torchrun``: process group, ranks, rank-0 decisions, the wrapper.

Gloo on CPU, NCCL on GPU. Safety decisions are taken on rank 0 and broadcast (:func:`from_rank0`),
and the wrapper is rebuilt after pruning replaces Parameters.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup_distributed(device: str = "auto") -> tuple[bool, torch.device]:
    """Join the process group torchrun describes; returns (whether we created it, device).

    ``device`` is ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (this rank's GPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda', but this torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use device='cpu' or 'auto'")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return created, device
    return created, torch.device("cpu")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank0(compute):
    """``compute()`` evaluated on rank 0 and broadcast to every rank (just called when alone)."""
    rank, world = rank_world()
    if world == 1:
        return compute()
    box = [compute() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if rank_world()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
