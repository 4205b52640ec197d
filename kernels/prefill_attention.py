"""Causal attention for prefill chunks, reading all keys (cached prefix and new tokens) through
the block table: variable-length sequences in one launch.

The new tokens of all sequences are concatenated ([T, H, D], `cu_seqlens_q` marks where each
starts); their K/V are already in the cache (rotary_store_kvcache runs first), so a fresh prompt
and a
chunk after a cached prefix are the same case: a sequence's new tokens are the last q_len of its
ctx_len tokens, and new token i sees keys 0 .. ctx_len - q_len + i. The grid is
(query tile, sequence, head) sized by the longest chunk; tiles past a shorter chunk's end exit at
once. Each tile runs a flash-attention online softmax over the keys its last row can see.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_tile import attend_kv_tile
from .pdl import pdl_launch_args, pdl_wait

# Hopper, head_dim 128, bf16: 64x64 tiles with 4 warps; two stages of K/V tiles (32 KiB each) in
# shared memory overlap the next tile's gather with this tile's two dots.
BLOCK_M = 64
BLOCK_N = 64


# The block table's width changes from step to step: not specialised on (no mid-run compiles).
@triton.jit(do_not_specialize=["stride_bt", "window"])
def _prefill_kernel(
    q,
    k_cache,
    v_cache,
    block_table,
    cu_seqlens_q,
    context_lens,
    out,
    scale_log2,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cs,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens + b)
    prefix = ctx - q_len
    kvh = h // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    qo_mask = (offs_m < q_len)[:, None] & d_mask[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    q_tile = tl.load(
        q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qo_mask, other=0.0
    )
    # Key n is visible to row m iff n <= prefix + m; rows past q_len see keys < kv_end only and
    # are never stored (every row sees key 0, so no row's softmax is empty).
    last_key = prefix + offs_m
    kv_end = tl.minimum(prefix + (tile + 1) * BLOCK_M, ctx)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_WINDOW:
        # Sliding window: row m sees keys n > prefix + m - window; the tile's tiles start at
        # its first row's first key (whole BLOCK_N tiles, masked below that).
        first_key = last_key - window + 1
        kv_start = tl.maximum(prefix + tile * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
        for n0 in range(kv_start, kv_end, BLOCK_N):
            n = n0 + offs_n
            m_i, l_i, acc = attend_kv_tile(
                q_tile,
                m_i,
                l_i,
                acc,
                n,
                n < kv_end,
                last_key,
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
                first_key,
            )
    else:
        for n0 in range(0, kv_end, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < kv_end
            m_i, l_i, acc = attend_kv_tile(
                q_tile,
                m_i,
                l_i,
                acc,
                n,
                n_mask,
                last_key,
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

    if HAS_WINDOW:  # rows past q_len may see no key in the window (never stored)
        l_i = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(
        out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        o.to(out.dtype.element_ty),
        mask=qo_mask,
    )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    block_size: int,
    max_q_len: int,
    out: torch.Tensor | None = None,
    pdl: int = 0,
    window: int | None = None,
) -> torch.Tensor:
    """q: [T, H, D] new tokens of B sequences; cu_seqlens_q: [B+1] int32; context_lens: [B] int32
    (all tokens, the new ones included); block_table: [B, max_blocks] int32; max_q_len: the
    longest chunk (a host int: it sizes the grid); pdl: the launch mode (kernels/pdl.py); window:
    sliding window (token i sees itself and the window - 1 keys before it). Returns [T, H, D] in
    q's dtype."""
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    assert h % hkv == 0 and k_cache.shape[2] == d and q.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert block_table.dtype == torch.int32 and block_table.stride(1) == 1
    if out is None:
        out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    b = context_lens.shape[0]
    if t == 0 or b == 0:
        return out
    grid = (triton.cdiv(max_q_len, BLOCK_M), b, h)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_table,
        cu_seqlens_q,
        context_lens,
        out,
        scale * math.log2(math.e),
        window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_table.stride(0),
        GROUP=h // hkv,
        HEAD_DIM=d,
        PAGE_SIZE=block_size,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=triton.next_power_of_2(d),
        # fp32 caches (exact-token tests on CUDA) must not be rounded to TF32; ignored for bf16.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_WINDOW=bool(window),
        num_warps=4,
        num_stages=2,
        **pdl_launch_args(pdl),
    )
    return out


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """Gather each sequence's K/V through its block table and attend in float32, causally with
    the chunk's offset (and within the sliding window, with one)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    for i, ctx in enumerate(context_lens.tolist()):
        q_len = cu[i + 1] - cu[i]
        pos = torch.arange(ctx, device=q.device)
        slots = block_table[i, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].float().repeat_interleave(group, 1)  # [ctx, H, D]
        v = v_cache[slots].float().repeat_interleave(group, 1)
        s = torch.einsum("mhd,nhd->hmn", q[cu[i] : cu[i + 1]].float(), k) * scale
        visible = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
        if window:
            visible = visible.triu(ctx - q_len - window + 1)
        p = s.masked_fill(~visible, float("-inf")).softmax(-1)
        out[cu[i] : cu[i + 1]] = torch.einsum("hmn,nhd->mhd", p, v).to(q.dtype)
    return out
