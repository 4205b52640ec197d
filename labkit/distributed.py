"""Tensor-parallel state shared by the layers: which rank this process is and how many there are.

TP=1 is TP with one rank: every collective below is the identity then, so the layers have one
code path. Ranks > 1 talk over torch.distributed (gloo on the CPU, NCCL on CUDA).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPState:
    rank: int = 0
    size: int = 1


_tp = TPState()


def tp() -> TPState:
    return _tp


def init_tp(rank: int, size: int, init_method: str, backend: str) -> None:
    _tp.rank, _tp.size = rank, size
    if size > 1:
        dist.init_process_group(backend, init_method=init_method, world_size=size, rank=rank,
                                timeout=datetime.timedelta(seconds=600))


def destroy_tp() -> None:
    if _tp.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _tp.rank, _tp.size = 0, 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp.size > 1:
        dist.all_reduce(x)
    return x


def gather_last_dim(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's shard along the last dim on rank 0; other ranks get None."""
    if _tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp.size)] if _tp.rank == 0 else None
    dist.gather(x.contiguous(), parts, dst=0)
    return torch.cat(parts, dim=-1) if _tp.rank == 0 else None


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"tensor_parallel_size={d} must divide {what} ({n})")
    return n // d
