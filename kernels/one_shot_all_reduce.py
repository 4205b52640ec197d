"""One-shot all-reduce over peer memory, for the small messages of tensor-parallel decode.

A decode step all-reduces a [batch, hidden] activation twice per layer (Qwen2.5-7B: 56 times of
8 x 3584 bf16 at batch 8). NCCL takes ~21 us per call in a CUDA graph (2 x H200), nearly all of
it latency; this kernel ~9.5 us. Here every rank can read every other rank's staging
buffer directly (CUDA IPC over NVLink), so one kernel does it all:

  1. each program copies its chunks of x into this rank's staging buffer;
  2. barrier with the same program on every rank (release our writes, acquire theirs);
  3. read the chunks from every rank's buffer, sum in float32 in rank order (so every rank gets
     bit-identical results), write them back into x;
  4. barrier again, so that no rank overwrites its buffer (next call) while a peer still reads it.

The barrier is a pad of int32 flags per rank, one per (program, peer): a signal sets the flag on
the peer from 0 to 1 (waiting while the previous signal is not yet consumed) and a wait sets our
own flag from 1 back to 0. The pad returns to all zeros after every call, so the kernel has no
host-side counter and replays from a CUDA graph as is. Programs of the same index meet on every
rank, so the grid must be the same on every rank (it is: same message size, same constants).

`buf_ptrs` / `sig_ptrs` are int64 tensors holding each rank's buffer / pad address as mapped into
this process (labkit.distributed.custom_all_reduce sets them up with cudaIpcOpenMemHandle). The
reference is the
plain sum over ranks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_args, pdl_wait

BLOCK = 2048
MAX_PROGRAMS = 32  # flags per rank in a signal pad: MAX_PROGRAMS * world


@triton.jit
def _signal_all(sig_ptrs, pid, RANK: tl.constexpr, WORLD: tl.constexpr, SEM: tl.constexpr):
    for p in tl.static_range(WORLD):
        pad = tl.load(sig_ptrs + p).to(tl.pointer_type(tl.int32))
        while tl.atomic_cas(pad + pid * WORLD + RANK, 0, 1, sem=SEM, scope="sys") != 0:
            pass


@triton.jit
def _wait_all(sig_ptrs, pid, RANK: tl.constexpr, WORLD: tl.constexpr, SEM: tl.constexpr):
    pad = tl.load(sig_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        while tl.atomic_cas(pad + pid * WORLD + p, 1, 0, sem=SEM, scope="sys") != 1:
            pass


@triton.jit(do_not_specialize=["N"])
def _one_shot_all_reduce_kernel(
    x,
    buf_ptrs,
    sig_ptrs,
    N,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    own = tl.load(buf_ptrs + RANK).to(tl.pointer_type(x.dtype.element_ty))
    for start in range(pid * BLOCK, N, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        tl.store(own + offs, tl.load(x + offs, mask=mask), mask=mask)
    tl.debug_barrier()
    _signal_all(sig_ptrs, pid, RANK, WORLD, "release")
    _wait_all(sig_ptrs, pid, RANK, WORLD, "acquire")
    tl.debug_barrier()
    for start in range(pid * BLOCK, N, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(WORLD):
            peer = tl.load(buf_ptrs + p).to(tl.pointer_type(x.dtype.element_ty))
            acc += tl.load(peer + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
        tl.store(x + offs, acc.to(x.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    _signal_all(sig_ptrs, pid, RANK, WORLD, "relaxed")
    _wait_all(sig_ptrs, pid, RANK, WORLD, "relaxed")


def one_shot_all_reduce(
    x: torch.Tensor,
    buf_ptrs: torch.Tensor,
    sig_ptrs: torch.Tensor,
    rank: int,
    world: int,
    pdl: int = 0,
) -> torch.Tensor:
    """Sum x over the ranks, in place. Every rank must call it with the same shape and dtype;
    each rank's staging buffer must hold x.numel() elements. pdl: the launch mode
    (kernels/pdl.py)."""
    assert x.is_contiguous()
    n = x.numel()
    grid = (max(1, min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)),)
    _one_shot_all_reduce_kernel[grid](
        x,
        buf_ptrs,
        sig_ptrs,
        n,
        RANK=rank,
        WORLD=world,
        BLOCK=BLOCK,
        num_warps=8,
        **pdl_launch_args(pdl),
    )
    return x


def one_shot_all_reduce_ref(xs: list[torch.Tensor]) -> torch.Tensor:
    """The sum of every rank's input, in float32 and rank order, rounded once."""
    acc = torch.zeros(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for x in xs:
        acc += x.float()
    return acc.to(xs[0].dtype)
