"""Mixture-of-experts feed-forward in two grouped GEMMs: out[t] = sum_k w[t, k] *
down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, k], for all tokens and experts at once.

Decode-sized batches (a configuration with `per_slot`) skip the sorting: `_slot_gemv_kernel` runs
one program per (token, slot) and column block, a read of that slot's expert like the decode
matmul's (kernels/gemv.py), the SiLU-and-mul folded into the down projection's input. At a few
tokens the slots' experts are mostly distinct, so nothing is read twice, and the three sorting
steps, the padding and the separate SiLU-and-mul kernel are gone.

1. `moe_align_block_size` (torch, no host sync): the T * k (token, slot) pairs sorted by expert,
   each expert's run padded to a multiple of BLOCK_M with a pad id (T * k), and the expert of
   every BLOCK_M block. The buffers are sized for the worst case (every expert padded), so
   their shapes depend only on T, k and E; blocks past the real total exit at once.
2. `_grouped_gemm_kernel` on x with w13 [E, 2I, H]: each program a BLOCK_M x BLOCK_N tile of one
   block's rows (gathered from x by token) times its expert's weight: [T * k, 2I].
3. labkit.kernels.silu_and_mul: [T * k, I].
4. `_grouped_gemm_kernel` on that with w2 [E, H, I], each row scaled by its routing weight.
5. The k rows of each token summed: [T, H].

Launch configurations per card and shape come from configs/fused_moe_<card>.json (the decode
matmul's mechanism, kernels/gemv.py): "E,N,K" -> {row-count bucket: config}; shapes no table
covers get `default_config`. dev/gpu_moe_tune.py writes a card's table.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemv_tiles import x_tile
from .pdl import pdl_launch_args, pdl_wait
from .silu_and_mul import silu_and_mul

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # (token, slot) rows per tile; the expert runs are padded to it
    block_n: int  # output features per tile
    block_k: int  # input features per step
    group_m: int = 8  # row blocks visited together (L2 reuse of the weight tiles)
    num_warps: int = 4
    num_stages: int = 2
    per_slot: bool = False  # `_slot_gemv_kernel` (block_m, group_m unused) for few tokens


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """(sorted_ids [P], block_experts [P / block_m], total [1]): the flat (token, slot) indices
    t * k + j sorted by expert, each expert's run padded with T * k to a multiple of block_m;
    the expert of each block; the padded total. P = T * k + E * (block_m - 1), rounded up to
    block_m: every layout fits, whatever the routing."""
    flat = topk_ids.flatten()
    n = flat.numel()
    # Not torch.bincount: on CUDA it reads the largest id back to the host, which stalls the
    # stream and breaks CUDA-graph capture.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    size = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    order = flat.argsort(stable=True)
    expert = flat[order]
    rank = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts)[expert]
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[expert] + rank] = order.to(torch.int32)
    starts = torch.arange(0, size, block_m, device=flat.device)
    block_experts = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_experts.to(torch.int32), ends[-1:].to(torch.int32)


@triton.jit
def _grouped_gemm_kernel(
    a,
    w,
    c,
    sorted_ids,
    block_experts,
    total,
    topk_weights,
    N,
    K,
    num_valid,
    stride_am,
    stride_we,
    stride_wn,
    stride_cm,
    TOP_K: tl.constexpr,
    A_PER_SLOT: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """c[s, :] = a[row(s), :] @ w[e].T (* topk_weights[s]) for the slots s of one block, e the
    block's expert; row(s) = s // TOP_K (a holds tokens) or s (A_PER_SLOT: a holds slots)."""
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_m = tl.num_programs(0) // blocks_n
    # Grouped ordering: GROUP_M row blocks share each column block of the weight in turn.
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    if pid_m * BLOCK_M >= tl.load(total):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids + offs_m)
    row_ok = slots < num_valid
    rows = slots if A_PER_SLOT else slots // TOP_K
    expert = tl.load(block_experts + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptr = a + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptr = w + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        at = tl.load(a_ptr + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + k0, mask=k_ok[:, None] & (offs_n < N)[None, :], other=0.0)
        acc = tl.dot(at, wt, acc, input_precision=PRECISION)
    if MUL_WEIGHT:
        acc *= tl.load(topk_weights + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(
        c + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
        acc.to(c.dtype.element_ty),
        mask=row_ok[:, None] & (offs_n < N)[None, :],
    )


@triton.jit
def _slot_gemv_kernel(
    a,
    w,
    c,
    topk_ids,
    topk_weights,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_cm,
    TOP_K: tl.constexpr,
    A_PER_SLOT: tl.constexpr,
    GATED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """c[s, n-block] = a_in(s) @ w[e].T (* topk_weights[s]) for slot s = program_id(0), e its
    expert; a_in(s) = a[s // TOP_K] (a holds tokens) or a[s] (A_PER_SLOT), and with GATED a is
    [gate | up] of width 2K and the input is silu(gate) * up."""
    pdl_wait(USE_PDL)  # the expert ids come from the router, the kernel before
    s = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    cols = tl.arange(0, BLOCK_K)
    expert = tl.load(topk_ids + s).to(tl.int64)
    row = s if A_PER_SLOT else s // TOP_K
    w_ptr = w + expert * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    # One float32 accumulator per weight element a thread holds, reduced once at the end.
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xv = x_tile(a, row, k0 + cols, row + 1, K, stride_am, GATED)
        wt = tl.load(w_ptr + k0, mask=n_ok[:, None] & (k0 + cols < K)[None, :], other=0.0)
        acc += wt.to(tl.float32) * xv[None, :]
    out = tl.sum(acc, axis=1)
    if MUL_WEIGHT:
        out *= tl.load(topk_weights + s).to(tl.float32)
    tl.store(c + s * stride_cm + offs_n, out.to(c.dtype.element_ty), mask=n_ok)


def _slot_gemv(a, w, c, ids, topk_weights, top_k, a_per_slot, gated, cfg, pdl) -> None:
    n, k = w.shape[1], w.shape[2]
    _slot_gemv_kernel[(c.shape[0], triton.cdiv(n, cfg.block_n))](
        a,
        w,
        c,
        ids,
        topk_weights if topk_weights is not None else a,
        n,
        k,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        c.stride(0),
        TOP_K=top_k,
        A_PER_SLOT=a_per_slot,
        GATED=gated,
        MUL_WEIGHT=topk_weights is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch_args(pdl),
    )


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    align,
    topk_weights,
    top_k: int,
    a_per_slot: bool,
    cfg: MoeConfig,
    pdl: int,
) -> None:
    sorted_ids, block_experts, total = align
    n, k = w.shape[1], w.shape[2]
    grid = (block_experts.numel() * triton.cdiv(n, cfg.block_n),)
    _grouped_gemm_kernel[grid](
        a,
        w,
        c,
        sorted_ids,
        block_experts,
        total,
        topk_weights if topk_weights is not None else a,
        n,
        k,
        c.shape[0],
        a.stride(0),
        w.stride(0),
        w.stride(1),
        c.stride(0),
        TOP_K=top_k,
        A_PER_SLOT=a_per_slot,
        MUL_WEIGHT=topk_weights is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        # float32 (exact-token tests on CUDA) must not be rounded to TF32; ignored for bf16.
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch_args(pdl),
    )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeConfig | None = None,
    pdl: int = 0,
) -> torch.Tensor:
    """x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; topk_weights,
    topk_ids: [T, k]. Returns [T, H] in x's dtype. `config` defaults to `choose_config`'s; pdl:
    the launch mode (kernels/pdl.py)."""
    t, h = x.shape
    e, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    assert w13.shape[2] == h and w2.shape == (e, h, two_i // 2) and x.stride(1) == 1
    assert w13.is_contiguous() and w2.is_contiguous() and x.dtype == w13.dtype == w2.dtype
    if t == 0:
        return torch.zeros_like(x)
    cfg = config or choose_config(t * top_k, e, two_i, h, x.device)
    gate_up = torch.empty((t * top_k, two_i), dtype=x.dtype, device=x.device)
    down = torch.empty((t * top_k, h), dtype=x.dtype, device=x.device)
    weights = topk_weights.to(x.dtype).flatten()
    if cfg.per_slot:
        ids = topk_ids.flatten()
        _slot_gemv(x, w13, gate_up, ids, None, top_k, False, False, cfg, pdl)
        _slot_gemv(gate_up, w2, down, ids, weights, top_k, True, True, cfg, pdl)
        return down.view(t, top_k, h).sum(dim=1)
    align = moe_align_block_size(topk_ids, cfg.block_m, e)
    _grouped_gemm(x, w13, gate_up, align, None, top_k, False, cfg, pdl)
    inter = silu_and_mul(gate_up, pdl=pdl)
    _grouped_gemm(inter, w2, down, align, weights, top_k, True, cfg, pdl)
    return down.view(t, top_k, h).sum(dim=1)


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Each (token, slot) through its expert in float32, weighted, summed over the slots."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for j in range(topk_ids.shape[1]):
        for e in topk_ids[:, j].unique().tolist():
            rows = (topk_ids[:, j] == e).nonzero().flatten()
            gate, up = (x[rows].float() @ w13[e].float().t()).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ w2[e].float().t()
            out[rows] += y * topk_weights[rows, j, None].float()
    return out.to(x.dtype)


def row_bucket(m: int) -> int:
    """Row counts (T * k) share a configuration by bucket: powers of two."""
    return triton.next_power_of_2(max(m, 1))


def config_path(device_name: str) -> Path:
    return CONFIG_DIR / f"fused_moe_{device_name.replace(' ', '_')}.json"


@functools.cache
def _table(device: torch.device) -> dict[str, dict[int, MoeConfig]]:
    """This card's tuned entries, "E,N,K" -> {row bucket: config}, from
    configs/fused_moe_<card name>.json; empty where there is none."""
    path = config_path(torch.cuda.get_device_name(device))
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())["configs"]
    return {
        shape: {int(m): MoeConfig(**c) for m, c in by_m.items()} for shape, by_m in entries.items()
    }


def default_config(m: int) -> MoeConfig:
    """Shapes without a table entry: what tuning found fastest at Qwen3-30B-A3B's expert shape on
    an H100 (configs/fused_moe_NVIDIA_H100_80GB_HBM3.json): per-slot reads up to 128 (token,
    slot) rows, 16-row blocks up to 1024, 64-row blocks up to 4096, 128 beyond. tl.dot needs 16
    or more in every tile dimension."""
    if m <= 128:
        return MoeConfig(1, 32, 256, 1, num_warps=2, num_stages=3, per_slot=True)
    if m <= 1024:
        return MoeConfig(16, 64, 128, 1, num_warps=4, num_stages=3)
    if m <= 4096:
        return MoeConfig(64, 64, 128, 8, num_warps=4, num_stages=3)
    return MoeConfig(128, 128, 64, 8, num_warps=8, num_stages=3)


def choose_config(m: int, e: int, n: int, k: int, device: torch.device) -> MoeConfig:
    """The configuration for m (token, slot) rows through E experts of [N, K]: the card's table
    entry for the nearest row bucket, else `default_config`."""
    by_m = _table(device).get(f"{e},{n},{k}") if device.type == "cuda" else None
    if not by_m:
        return default_config(m)
    bucket = row_bucket(m)
    return by_m[min(by_m, key=lambda b: abs(b - bucket))]
