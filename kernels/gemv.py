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
configurations per card and shape: gemv_configs.py.

FP8 weights (float8_e4m3fn, one byte each, float32 scales per output row or per block) go through
the same two loops, selected by constexpr modes: per-row scales multiply the sums once at the end,
block scales each weight element as it is read. The input comes quantized to float8_e4m3fn with a
scale per row (kernels/fp8_quant.py, once per call: computed here, every program would repeat the
amax pass over the row and the rounding of each input tile, work that at one byte a weight costs
more than the reads), or is rounded here per row and group of columns (within a tile) and back to
its dtype: the numerics of labkit.layers.quantization.fp8.fp8_linear, which is this path's
reference (the kernels cannot import it, the tests compare the two). The FMA loop converts each
weight to float32; the tensor-core loop multiplies in FP8 where it can (`fp8_tensor_cores`: a
quantized input and a half-precision product): the weight's and the input's bytes go to the
tensor cores unconverted. The scales multiply the float32 sums (block scales per tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv_configs import FMA_MAX_ROWS, MAX_ROWS, GemvConfig, heuristic_config
from .gemv_tiles import (
    A_QUANTIZED,
    W_BLOCK,
    Fp8Operands,
    block_scale_column,
    fp8_modes,
    fp8_tensor_cores,
    input_row_scales,
    row_scaled,
    w_in,
    weight_tile,
    x_in,
    x_load,
)
from .pdl import pdl_launch_args, pdl_wait


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
    first = weight_tile(w_ptr, k_start, k_end, K, row_ok, cols, SPLIT_K > 1)
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
    w_scale,
    x_scale,
    bias,
    y,
    ws,
    counters,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_SCALE: tl.constexpr,
    SCALE_BN: tl.constexpr,
    SCALE_BK: tl.constexpr,
    ACT: tl.constexpr,
    ACT_GROUP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    rows, cols, row_ok, w_ptr, w_cur, k_start, k_end = _prologue(
        w, N, K, stride_wn, BLOCK_N, BLOCK_K, SPLIT_K, USE_PDL
    )
    # One accumulator per row of x (BLOCK_M is 1 or 2), each the weight tile's shape.
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_next = weight_tile(w_ptr, k0 + BLOCK_K, k_end, K, row_ok, cols, SPLIT_K > 1)
        wf = w_in(
            w_cur, w_scale, rows, row_ok, k0 + cols, K, stride_sn, W_SCALE, SCALE_BN, SCALE_BK
        ).to(tl.float32)
        kk = (k0 + cols)[None, :]
        acc0 += wf * x_in(x, 0, kk, M, K, stride_xm, GATED, ACT, ACT_GROUP, 1)
        if BLOCK_M > 1:
            acc1 += wf * x_in(x, 1, kk, M, K, stride_xm, GATED, ACT, ACT_GROUP, 1)
        w_cur = w_next
    ms = tl.arange(0, 2)
    part = tl.where(ms[None, :] == 0, tl.sum(acc0, 1)[:, None], tl.sum(acc1, 1)[:, None])
    if ACT == A_QUANTIZED:
        part = part * input_row_scales(x_scale, ms, M)[None, :]
    part = row_scaled(part, w_scale, rows, row_ok, W_SCALE)
    _epilogue(y, bias, ws, counters, part, rows, row_ok, ms, M, N, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _gemv_dot_kernel(
    x,
    w,
    w_scale,
    x_scale,
    bias,
    y,
    ws,
    counters,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_SCALE: tl.constexpr,
    SCALE_BN: tl.constexpr,
    SCALE_BK: tl.constexpr,
    ACT: tl.constexpr,
    ACT_GROUP: tl.constexpr,
    FP8_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    rows, cols, row_ok, w_ptr, w_cur, k_start, k_end = _prologue(
        w, N, K, stride_wn, BLOCK_N, BLOCK_K, SPLIT_K, USE_PDL
    )
    ms = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_next = weight_tile(w_ptr, k0 + BLOCK_K, k_end, K, row_ok, cols, SPLIT_K > 1)
        if FP8_DOT:  # the weight's and the input's bytes go to the tensor cores as they are
            xq = x_load(x, ms[None, :], (k0 + cols)[:, None], M, K, stride_xm, 0)
            if W_SCALE == W_BLOCK:
                s = block_scale_column(w_scale, rows, row_ok, k0, stride_sn, SCALE_BN, SCALE_BK)
                acc += tl.dot(w_cur, xq) * s[:, None]
            else:
                acc = tl.dot(w_cur, xq, acc)
        else:
            wt = w_in(
                w_cur, w_scale, rows, row_ok, k0 + cols, K, stride_sn, W_SCALE, SCALE_BN, SCALE_BK
            ).to(y.dtype.element_ty)
            xt = x_in(
                x, ms[None, :], (k0 + cols)[:, None], M, K, stride_xm, GATED, ACT, ACT_GROUP, 0
            )
            acc = tl.dot(wt, xt.to(y.dtype.element_ty), acc, input_precision=PRECISION)
        w_cur = w_next
    if ACT == A_QUANTIZED:
        acc = acc * input_row_scales(x_scale, ms, M)[None, :]
    acc = row_scaled(acc, w_scale, rows, row_ok, W_SCALE)
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
    fp8: Fp8Operands | None = None,
) -> torch.Tensor:
    """x: [M, K] (gated: [M, 2K], gate first), M <= MAX_ROWS; w: [N, K] in x's dtype, or
    float8_e4m3fn with `fp8` saying its scales and how x is rounded (x quantized to float8 for
    "token" and "tensor"); bias: [N] or None; all with unit last stride. Returns [M, N] in x's
    dtype (`fp8.dtype` for a quantized x). `config` defaults to
    `heuristic_config`; a split-K config needs a `workspace` on x's device. pdl: the launch mode
    (kernels/pdl.py)."""
    m = x.shape[0]
    n, k = w.shape
    assert m <= MAX_ROWS and x.shape[1] == (2 * k if gated else k), (x.shape, w.shape, gated)
    assert x.stride(1) == 1 and w.stride(1) == 1
    assert x.dtype == w.dtype if fp8 is None else w.dtype == torch.float8_e4m3fn
    quantized = fp8 is not None and fp8.quantized_input
    if quantized:
        assert x.dtype == torch.float8_e4m3fn and not gated, (x.dtype, gated)
        assert fp8.input_scale is not None and fp8.input_scale.numel() == m and fp8.dtype
    cfg = config or heuristic_config(m, k)
    assert cfg.dot or m <= FMA_MAX_ROWS, (m, cfg)
    y = torch.empty((m, n), dtype=fp8.dtype if quantized else x.dtype, device=x.device)
    if m == 0:
        return y
    blocks = triton.cdiv(n, cfg.block_n)
    if cfg.split_k > 1:
        assert workspace is not None and workspace.device == x.device, "split-K needs a workspace"
        ws, counters = workspace.get(cfg.split_k * MAX_ROWS * n, blocks)
    else:
        ws = counters = y  # never touched: SPLIT_K=1 compiles the split-K path out
    scale = w if fp8 is None else fp8.weight_scale
    args = (
        x,
        w,
        scale,
        fp8.input_scale if quantized else scale,
        bias if bias is not None else w,
        y,
        ws,
        counters,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        scale.stride(0),
        y.stride(0),
    )
    common = dict(
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        GATED=gated,
        HAS_BIAS=bias is not None,
        **fp8_modes(fp8, cfg.block_k),
        num_warps=cfg.num_warps,
        num_stages=1,
        **pdl_launch_args(pdl),
    )
    grid = (blocks, cfg.split_k)
    if cfg.dot:
        # float32 (exact-token tests on CUDA) must not be rounded to TF32; ignored for bf16.
        _gemv_dot_kernel[grid](
            *args,
            FP8_DOT=fp8_tensor_cores(fp8, y.dtype, cfg.block_k),
            PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
            **common,
        )
    else:
        _gemv_fma_kernel[grid](*args, BLOCK_M=triton.next_power_of_2(m), **common)
    return y


def gemv_ref(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, gated: bool = False
) -> torch.Tensor:
    """The float reference of a float weight (an FP8 weight's is fp8_linear, see above)."""
    if gated:
        gate, up = x.float().chunk(2, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
