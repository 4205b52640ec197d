"""Paged attention for decode: one query token per sequence, K/V read through a block table.

Flash-decoding: the grid is (sequence, KV head, split). Each program takes one KV head with all
of its G = num_heads / num_kv_heads query heads as the rows of a tile (so every K/V element is
read from memory once, not G times) and one contiguous slice of the context, and runs an online
softmax over it. With one split the program writes the output directly; with several, each writes
its partial output and log-sum-exp, and a second kernel combines them. Splits are what keep the
GPU busy at small batch: batch 1 with 4 KV heads is only 4 programs without them.

The number of splits depends only on shapes (batch size, block-table width), never on the
context lengths themselves: each sequence divides its own context among the splits, so the grid
is fixed for a captured batch size and the launch fits in a CUDA graph. A context length of 0 (a
padding row) gives
zeros.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .attention_tile import attend_kv_tile
from .pdl import pdl_launch_args, pdl_wait

BLOCK_N = 64  # context tokens per tile: a [64, 128] bf16 K tile is 16 KiB
MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost (q load, partial write) dominates
# The combine kernel is compiled for this many splits whatever the count, and the split count
# and block-table stride are not specialised on: eager steps of changing batches must never
# JIT-compile a new variant mid-run (each costs ~1 s; a 256-request throughput run paid 5 s of
# them).
MAX_SPLITS = 32


@triton.jit(do_not_specialize=["num_splits", "stride_bt", "window"])
def _decode_kernel(
    q,
    k_cache,
    v_cache,
    block_table,
    context_lens,
    out,
    part_out,
    part_lse,
    scale_log2,
    num_splits,
    window,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cs,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens + b)
    # A sliding window (window > 0) sees the last `window` keys: the splits share [lo, ctx).
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    # Whole tiles per split, so only a split's last tile is partial.
    split_len = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    d_mask = offs_d < HEAD_DIM
    qo_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
    q_tile = tl.load(
        q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=qo_mask, other=0.0
    )

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        m_i, l_i, acc = attend_kv_tile(
            q_tile,
            m_i,
            l_i,
            acc,
            n,
            n_mask,
            None,
            block_table + b * stride_bt,
            k_cache,
            v_cache,
            kvh,
            stride_cs,
            stride_ch,
            offs_d,
            d_mask,
            scale_log2,
            PAGE_SIZE,
            PRECISION,
        )

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split (or context) gives zeros
    if DIRECT:  # one split: this is the final output
        tl.store(
            out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out.dtype.element_ty),
            mask=qo_mask,
        )
    else:
        # part_out: [B, H, num_splits, BLOCK_D] fp32; part_lse: [B, H, num_splits] (base 2).
        row = (b * GROUP * tl.num_programs(1) + heads) * num_splits + split
        tl.store(part_out + row[:, None] * BLOCK_D + offs_d[None, :], o, mask=qo_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse + row, lse, mask=offs_g < GROUP)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    part_out,
    part_lse,
    out,
    num_splits,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row = (b * tl.num_programs(1) + h) * num_splits + offs_s
    lse = tl.load(part_lse + row, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # every split empty: all weights 0, output 0
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    o = tl.load(
        part_out + row[:, None] * BLOCK_D + offs_d[None, :],
        mask=(offs_s < num_splits)[:, None],
        other=0.0,
    )
    total = tl.sum(w, 0)
    o = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out + b * stride_ob + h * stride_oh + offs_d,
        o.to(out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter (CPU): a few splits still exercise the combine path


def default_num_splits(
    batch: int, num_kv_heads: int, max_context_len: int, device: torch.device
) -> int:
    """Enough (batch, KV head, split) programs for about four waves over the SMs (rounded down to
    a power of two), but no split shorter than MIN_TOKENS_PER_SPLIT tokens. Four, not two: on an
    H200 at batch 8 (32 batch x KV-head pairs) 16 splits beat 8 or 9 by 0.6-1.5 us per call for
    contexts of 1024-2048 (dev/gpu_decode_sweep.py; the H200 sweep in dev/PERF_NOTES.md)."""
    want = 1 << max(0, (4 * _num_sms(device) // (batch * num_kv_heads)).bit_length() - 1)
    return max(1, min(want, MAX_SPLITS, math.ceil(max_context_len / MIN_TOKENS_PER_SPLIT)))


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    *,
    window: int | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
    pdl: int = 0,
) -> torch.Tensor:
    """q: [B, H, D]; caches: [num_blocks * block_size, Hkv, D]; block_table: [B, max_blocks]
    int32; context_lens: [B] int32 (tokens to attend, the current one included). Returns
    [B, H, D] in q's dtype (written into `out` if given). `num_splits` defaults to
    `default_num_splits` with the block table's width as the longest context (with a `window`,
    each query attends to its last `window` keys only: at most the window). block_n (context
    tokens per tile), num_warps and num_stages are the launch's tuning knobs (the defaults were
    chosen with dev/gpu_decode_sweep.py). pdl: the launch mode (kernels/pdl.py)."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    assert h % hkv == 0 and k_cache.shape[2] == d and q.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert block_table.dtype == torch.int32 and block_table.stride(1) == 1
    if out is None:
        out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    if num_splits is None:
        longest = block_table.shape[1] * block_size
        num_splits = default_num_splits(b, hkv, min(longest, window or longest), q.device)
    assert 1 <= num_splits <= MAX_SPLITS
    group = h // hkv
    block_d = triton.next_power_of_2(d)
    if num_splits > 1:
        part_out = torch.empty((b, h, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device)
    else:  # written straight into out; these are never touched
        part_out = part_lse = out
    # An eager step's split count follows its block table's width: runtime arguments only.
    _decode_kernel[(b, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_table,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * math.log2(math.e),
        num_splits,
        window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_table.stride(0),
        GROUP=group,
        HEAD_DIM=d,
        PAGE_SIZE=block_size,
        DIRECT=num_splits == 1,
        # tl.dot needs at least 16 rows: the G query heads are padded up to 16.
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        # fp32 caches (exact-token tests on CUDA) must not be rounded to TF32; ignored for bf16.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch_args(pdl),
    )
    if num_splits > 1:
        _combine_kernel[(b, h)](
            part_out,
            part_lse,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=d,
            BLOCK_S=MAX_SPLITS,
            BLOCK_D=block_d,
            num_warps=4,
            **pdl_launch_args(pdl),
        )
    return out


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """Gather each sequence's K/V through its block table and attend in float32 (to the last
    `window` keys only, with a window)."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[1]
    for i, ctx in enumerate(context_lens.tolist()):
        if ctx == 0:
            continue
        pos = torch.arange(max(ctx - window, 0) if window else 0, ctx, device=q.device)
        slots = block_table[i, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].float().repeat_interleave(group, 1)  # [ctx, H, D]
        v = v_cache[slots].float().repeat_interleave(group, 1)
        p = torch.einsum("hd,nhd->hn", q[i].float(), k).mul(scale).softmax(-1)
        out[i] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out
