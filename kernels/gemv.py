"""y = x @ w.T (+ bias) for the few rows of a decode step: a pass over the weight that starts
before the kernel ahead of it has finished.

At 1-16 rows a linear layer is a read of its weight, and a decode step is ~200 such reads in a
row, each a few microseconds long. Three things here that cuBLAS's kernels do not do:

1. Weight prefetch under programmatic dependent launch (kernels/pdl.py). A program loads its
   first weight tile and only then waits for the kernel ahead of it: the weights are constants,
   so reading them early is safe, and the time to the first bytes overlaps the previous kernel's
   tail. `pdl_wait` then lets the kernel after this one be scheduled, so it can do the same.
2. The MLP's activation fused into the input: with `gated=True`, x is the merged gate/up
   projection's output [M, 2K] and the kernel multiplies by silu(gate) * up (rounded to x's
   dtype, as silu_and_mul rounds it) as it reads; the SiLU-and-mul kernel disappears (where the
   configuration's `fuse_act` says that is faster: callers check it).
3. Split-K with the reduction in the same kernel: a weight with few rows (o_proj, down_proj:
   3584) gives too few programs to keep enough bytes in flight, so K is split over `split_k`
   programs per row block. Each writes its float32 partial sums and counts itself in; the last
   to arrive adds the partials in split order (the result does not depend on who came last),
   writes y and resets the count. One kernel, no memset: it replays from a CUDA graph as is.

Two inner loops. Up to FMA_MAX_ROWS rows, plain FMAs: each thread keeps a float32 accumulator
per weight element it owns and reduces once at the end. Up to MAX_ROWS rows, tensor cores:
acc[BLOCK_N, 16] = w_tile @ x_tile^T, x's rows padded to 16 (free: the kernel waits on memory).
Both keep the next weight tile's load in flight while the current one is multiplied. Launch
configurations per card and shape come from dev/gpu_gemv.py (configs/), which also
records where cuBLAS is faster: there `choose_config` returns None and the caller uses F.linear.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_args, pdl_wait

FMA_MAX_ROWS = 2
MAX_ROWS = 16
CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows (outputs) per program
    block_k: int  # input features per tile
    num_warps: int
    dot: bool  # tensor cores (rows padded to 16) instead of FMAs
    split_k: int = 1  # programs per row block, each over a slice of K
    # For a gated input: silu(gate) * up inside this kernel, or by silu_and_mul first. Fused, it
    # is recomputed by every row block: cheap for a wide weight, not for down_proj's 3584 rows.
    fuse_act: bool = True


@triton.jit
def _x_tile(x, m, kk, M, K, stride_xm, GATED: tl.constexpr):
    """Rows m, columns kk of the layer's input, in float32 (broadcast shapes). GATED: x is the
    merged [gate | up] output and the input is silu(gate) * up, rounded to x's dtype."""
    ok = (kk < K) & (kk * 0 + m < M)  # m < M as a tensor of kk's shape: m may be a plain int
    p = x + m * stride_xm + kk
    v = tl.load(p, mask=ok, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(p + K, mask=ok, other=0.0).to(tl.float32)
        v = (v * tl.sigmoid(v) * up).to(x.dtype.element_ty).to(tl.float32)
    return v


@triton.jit
def _weight_tile(w_ptr, k0, k_end, K, row_ok, cols, SPLIT: tl.constexpr):
    """The weight tile at k0 (zeros past K). SPLIT: only if k0 is still inside this program's
    slice of K (which ends at k_end), else zeros and no loads."""
    # Masked per element, but K is a multiple of 16 in every real model (Triton specialises on
    # it), so the mask is uniform over each 16-byte vector: the loads stay wide.
    in_k = k0 + cols < K
    if SPLIT:  # (a vector compare: the interpreter's & mistypes scalars)
        in_k = in_k & (cols * 0 + k0 < k_end)
    return tl.load(w_ptr + k0, mask=row_ok[:, None] & in_k[None, :], other=0.0)


@triton.jit
def _prologue(
    w,
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """This program's rows and K slice, its weight pointers and first weight tile, loaded
    before waiting for the previous kernel."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    if SPLIT_K > 1:
        per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole tiles per split
        k_start = tl.program_id(1) * per_split
        k_end = tl.minimum(k_start + per_split, K)
    else:  # plain bounds: the loop compiles as it would without split-K (fewer instructions)
        k_start = 0
        k_end = K
    w_ptr = w + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    first = _weight_tile(w_ptr, k_start, k_end, K, row_ok, cols, SPLIT_K > 1)
    pdl_wait(USE_PDL)
    return rows, cols, row_ok, w_ptr, first, k_start, k_end


@triton.jit
def _epilogue(
    y,
    bias,
    ws,
    counters,
    part,
    rows,
    row_ok,
    ms,
    M,
    N,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Store part ([BLOCK_N, R] float32 sums, column r = row r of x) as y, or with split-K as
    this split's partial; the last split of the row block to arrive writes y."""
    mask = row_ok[:, None] & (ms < M)[None, :]
    finish = True
    if SPLIT_K > 1:
        # ws: [SPLIT_K, 16 (MAX_ROWS), N] float32. Every thread's partial is written before the
        # count
        # goes up (barrier, then a release); the last one reads them after its acquire, past
        # the L1 (.cg), which may hold lines an earlier program read.
        tile = ms[None, :] * N + rows[:, None]
        tl.store(ws + tl.program_id(1) * 16 * N + tile, part, mask=mask)
        tl.debug_barrier()
        counter = counters + tl.program_id(0)
        finish = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if finish:
            part = tl.load(ws + tile, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                part += tl.load(ws + s * 16 * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)
    if finish:
        if HAS_BIAS:
            part += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(
            y + ms[None, :] * stride_ym + rows[:, None], part.to(y.dtype.element_ty), mask=mask
        )


@triton.jit(do_not_specialize=["M"])
def _gemv_fma_kernel(
    x,
    w,
    bias,
    y,
    ws,
    counters,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    rows, cols, row_ok, w_ptr, w_cur, k_start, k_end = _prologue(
        w, N, K, stride_wn, BLOCK_N, BLOCK_K, SPLIT_K, USE_PDL
    )
    # One accumulator per row of x (BLOCK_M is 1 or 2), each the weight tile's shape.
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_next = _weight_tile(w_ptr, k0 + BLOCK_K, k_end, K, row_ok, cols, SPLIT_K > 1)
        wf = w_cur.to(tl.float32)
        kk = (k0 + cols)[None, :]
        acc0 += wf * _x_tile(x, 0, kk, M, K, stride_xm, GATED)
        if BLOCK_M > 1:
            acc1 += wf * _x_tile(x, 1, kk, M, K, stride_xm, GATED)
        w_cur = w_next
    ms = tl.arange(0, 2)
    part = tl.where(ms[None, :] == 0, tl.sum(acc0, 1)[:, None], tl.sum(acc1, 1)[:, None])
    _epilogue(y, bias, ws, counters, part, rows, row_ok, ms, M, N, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _gemv_dot_kernel(
    x,
    w,
    bias,
    y,
    ws,
    counters,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    rows, cols, row_ok, w_ptr, w_cur, k_start, k_end = _prologue(
        w, N, K, stride_wn, BLOCK_N, BLOCK_K, SPLIT_K, USE_PDL
    )
    ms = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_next = _weight_tile(w_ptr, k0 + BLOCK_K, k_end, K, row_ok, cols, SPLIT_K > 1)
        xt = _x_tile(x, ms[None, :], (k0 + cols)[:, None], M, K, stride_xm, GATED)
        acc = tl.dot(w_cur, xt.to(w.dtype.element_ty), acc, input_precision=PRECISION)
        w_cur = w_next
    _epilogue(y, bias, ws, counters, acc, rows, row_ok, ms, M, N, stride_ym, HAS_BIAS, SPLIT_K)


class GemvWorkspace:
    """The split-K partials (float32 [split_k, MAX_ROWS, N]) and per-row-block arrival counts
    (int32 zeros; every call leaves them zero) of one engine's calls on one device, shared by all
    of them: the calls run one after another on the stream. Sized by the largest call so far; a
    grown-out pair is kept until `close`, since a captured CUDA graph may still point at it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.current: tuple[torch.Tensor, torch.Tensor] | None = None
        self.retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, partial_elems: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        cur = self.current
        if cur is None or cur[0].numel() < partial_elems or cur[1].numel() < blocks:
            if cur is not None:
                self.retired.append(cur)
                partial_elems = max(partial_elems, cur[0].numel())
                blocks = max(blocks, cur[1].numel())
            cur = self.current = (
                torch.empty(partial_elems, dtype=torch.float32, device=self.device),
                torch.zeros(blocks, dtype=torch.int32, device=self.device),
            )
        return cur

    def close(self) -> None:
        """Frees the buffers (once no graph that uses them will replay)."""
        self.current, self.retired = None, []


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gated: bool = False,
    config: GemvConfig | None = None,
    workspace: GemvWorkspace | None = None,
    pdl: int = 0,
) -> torch.Tensor:
    """x: [M, K] (gated: [M, 2K], gate first), M <= MAX_ROWS; w: [N, K]; bias: [N] or None; all
    with unit last stride. Returns [M, N] in x's dtype. `config` defaults to
    `heuristic_config`; a split-K config needs a `workspace` on x's device. pdl: the launch mode
    (kernels/pdl.py)."""
    m = x.shape[0]
    n, k = w.shape
    assert m <= MAX_ROWS and x.shape[1] == (2 * k if gated else k), (x.shape, w.shape, gated)
    assert x.stride(1) == 1 and w.stride(1) == 1 and x.dtype == w.dtype
    cfg = config or heuristic_config(m, k)
    assert cfg.dot or m <= FMA_MAX_ROWS, (m, cfg)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    blocks = triton.cdiv(n, cfg.block_n)
    if cfg.split_k > 1:
        assert workspace is not None and workspace.device == x.device, "split-K needs a workspace"
        ws, counters = workspace.get(cfg.split_k * MAX_ROWS * n, blocks)
    else:
        ws = counters = y  # never touched: SPLIT_K=1 compiles the split-K path out
    args = (
        x,
        w,
        bias if bias is not None else w,
        y,
        ws,
        counters,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        y.stride(0),
    )
    common = dict(
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        GATED=gated,
        HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps,
        num_stages=1,
        **pdl_launch_args(pdl),
    )
    grid = (blocks, cfg.split_k)
    if cfg.dot:
        # float32 (exact-token tests on CUDA) must not be rounded to TF32; ignored for bf16.
        _gemv_dot_kernel[grid](
            *args, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **common
        )
    else:
        _gemv_fma_kernel[grid](*args, BLOCK_M=triton.next_power_of_2(m), **common)
    return y


def gemv_ref(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, gated: bool = False
) -> torch.Tensor:
    if gated:
        gate, up = x.float().chunk(2, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def row_bucket(m: int) -> int:
    """Row counts share a configuration by bucket: 1, 2, 4, 8, 16."""
    return triton.next_power_of_2(max(m, 1))


def config_path(device_name: str) -> Path:
    return CONFIG_DIR / f"gemv_{device_name.replace(' ', '_')}.json"


@functools.cache
def _table(device: torch.device) -> dict[str, GemvConfig | None]:
    """This card's tuned entries, "bucket,n,k" -> config, or None where cuBLAS is faster, from
    configs/gemv_<card name>.json as dev/gpu_gemv.py writes it."""
    path = config_path(torch.cuda.get_device_name(device))
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())["configs"]
    return {key: GemvConfig(**c) if c else None for key, c in entries.items()}


def heuristic_config(m: int, k: int) -> GemvConfig:
    """For shapes no table covers: FMAs up to FMA_MAX_ROWS rows, tensor cores above."""
    if m <= FMA_MAX_ROWS:
        return GemvConfig(
            block_n=4, block_k=min(512, triton.next_power_of_2(k)), num_warps=2, dot=False
        )
    return GemvConfig(
        block_n=64, block_k=min(128, max(16, triton.next_power_of_2(k))), num_warps=4, dot=True
    )


def choose_config(m: int, n: int, k: int, device: torch.device) -> GemvConfig | None:
    """The launch configuration for an [m, k] x [n, k]^T product on a CUDA device, or None where
    F.linear (cuBLAS) is the better choice: the card's tuned table first; untuned shapes get the
    heuristic up to FMA_MAX_ROWS rows (a weight read at a few rows has one good shape on any
    card) and cuBLAS above."""
    if m > MAX_ROWS:
        return None
    key = f"{row_bucket(m)},{n},{k}"
    table = _table(device)
    if key in table:
        return table[key]
    return heuristic_config(m, k) if m <= FMA_MAX_ROWS else None
