"""y = x @ w.T (+ bias) for the few rows of a decode step, reading the weight once at close to
the copy bandwidth, with its split-K reduction done inside the same kernel.

At 1-16 rows a GEMM is a weight read. cuBLAS reads Qwen2.5-7B's o_proj and qkv_proj weights at
2.3-3.0 TB/s on an H200 (of ~4.2) and runs its split-K reduction as a second kernel (PERF_NOTES).
Here the grid is (N tile, K split): each program accumulates a [16, BLOCK_N] tile over its slice
of K in float32 with tl.dot (the rows padded to 16), pipelining the weight loads. With one split
it writes y. With several, it writes its partial tile into a float32 workspace and counts itself
in with an atomic; the last split of a tile to arrive sums the partials in split order (the
result does not depend on arrival order), adds the bias, writes y and resets the counter to 0:
one kernel, no memset, and the launch replays from a CUDA graph as is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_args

BLOCK_M = 16     # tl.dot's smallest row count: the step's rows, zero-padded
MAX_ROWS = BLOCK_M


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit(do_not_specialize=["M", "k_per_split"])
def _skinny_gemm_kernel(x, w, bias, y, partials, counters, M, N, k_per_split,
                        stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                        USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        k = k0 + offs_k
        xt = tl.load(x + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None], other=0.0)
        wt = tl.load(w + offs_n[:, None].to(tl.int64) * stride_wn + k[None, :],
                     mask=n_mask[:, None], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    finish = True
    if SPLIT:
        tile = (split * BLOCK_M + offs_m)[:, None] * N + offs_n[None, :]
        tl.store(partials + tile, acc, mask=n_mask[None, :])
        tl.debug_barrier()  # every thread's partial is written before the count goes up
        arrived = tl.atomic_add(counters + pid_n, 1, sem="acq_rel", scope="gpu")
        finish = arrived == tl.num_programs(1) - 1
        if finish:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(0, tl.num_programs(1)):
                tile = (s * BLOCK_M + offs_m)[:, None] * N + offs_n[None, :]
                acc += tl.load(partials + tile, mask=n_mask[None, :], other=0.0, volatile=True)
            tl.atomic_xchg(counters + pid_n, 0)
    if finish:
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


class _Workspace:
    """Float32 partial tiles and per-tile counters, one set per device, shared by every call (the
    calls run one after another on the stream). It only grows; a grown-out buffer is kept alive,
    since a captured CUDA graph may still point at it."""

    def __init__(self):
        self.buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, partial_elems: int, tiles: int):
        cur = self.buffers.get(device)
        if cur is None or cur[0].numel() < partial_elems or cur[1].numel() < tiles:
            if cur is not None:
                self.retired.append(cur)
            size = max(partial_elems, cur[0].numel() if cur else 0)
            count = max(tiles, cur[1].numel() if cur else 0)
            cur = (torch.empty(size, dtype=torch.float32, device=device),
                   torch.zeros(count, dtype=torch.int32, device=device))
            self.buffers[device] = cur
        return cur


_workspace = _Workspace()


def default_config(n: int, k: int) -> SkinnyConfig:
    return SkinnyConfig()


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                config: SkinnyConfig | None = None) -> torch.Tensor:
    """x: [M, K] with M <= 16, w: [N, K] (both with unit last stride), bias: [N] or None.
    K must be a multiple of block_k * splits. Returns [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    cfg = config or default_config(n, k)
    assert m <= MAX_ROWS and w.shape[1] == k and x.stride(1) == 1 and w.stride(1) == 1
    assert k % (cfg.block_k * cfg.splits) == 0, (k, cfg)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    tiles = triton.cdiv(n, cfg.block_n)
    if cfg.splits > 1:
        partials, counters = _workspace.get(x.device, cfg.splits * BLOCK_M * n, tiles)
    else:
        partials, counters = y, y  # never touched: SPLIT=False compiles them out
    _skinny_gemm_kernel[(tiles, cfg.splits)](
        x, w, bias if bias is not None else w, y, partials, counters, m, n, k // cfg.splits,
        x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, SPLIT=cfg.splits > 1, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch_args())
    return y


def skinny_gemm_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ w.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
