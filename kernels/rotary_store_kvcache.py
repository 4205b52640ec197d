"""Rotary embedding and the KV-cache write in one kernel: q is rotated in place, k is rotated on
its way into the paged cache, v is copied there, all by slot mapping.

One launch instead of two per layer (the rotated k is needed only in the cache: every attention
kernel reads K through the block table, the new tokens' K included). Rotary is the neox/HF
"rotate half" layout: for each head, with x = [x1, x2] split in halves,
out = [x1*cos - x2*sin, x2*cos + x1*sin]; the tables are cos/sin of cat(freqs, freqs), so their
two halves are equal and only the first is read. Math in float32, one rounding to q's dtype.

Caches are `[num_blocks * block_size, num_kv_heads, head_dim]`: a flat slot axis, slot =
block_id * block_size + offset. One program per token: the position and slot are looked up once
for all its heads. Slot -1 is padding (CUDA graphs pad the batch): its K/V are not stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_args, pdl_wait


@triton.jit
def _rotate_heads(
    src,
    dst,
    t_src,
    stride_sh,
    dst_row,
    stride_dh,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    p1 = src + t_src + h * stride_sh + d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = dst + dst_row + h * stride_dh + d
    tl.store(o1, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(o1 + HALF, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_store_kernel(
    positions,
    slot_mapping,
    q,
    k,
    v,
    k_cache,
    v_cache,
    cos_table,
    sin_table,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_ch,
    stride_table,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t)
    half = tl.arange(0, BLOCK_D // 2)
    cos = tl.load(cos_table + pos * stride_table + half, mask=half < HEAD_DIM // 2, other=0.0)[
        None, :
    ]
    sin = tl.load(sin_table + pos * stride_table + half, mask=half < HEAD_DIM // 2, other=0.0)[
        None, :
    ]
    _rotate_heads(
        q,
        q,
        t * stride_qt,
        stride_qh,
        t * stride_qt,
        stride_qh,
        cos,
        sin,
        NUM_Q_HEADS,
        HEAD_DIM // 2,
        BLOCK_QH,
        BLOCK_D // 2,
    )
    slot = tl.load(slot_mapping + t).to(tl.int64)  # int64: slot * stride can pass 2**31
    if slot >= 0:
        _rotate_heads(
            k,
            k_cache,
            t * stride_kt,
            stride_kh,
            slot * stride_cs,
            stride_ch,
            cos,
            sin,
            NUM_KV_HEADS,
            HEAD_DIM // 2,
            BLOCK_KH,
            BLOCK_D // 2,
        )
        h = tl.arange(0, BLOCK_KH)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        tl.store(
            v_cache + slot * stride_cs + h * stride_ch + d,
            tl.load(v + t * stride_vt + h * stride_vh + d, mask=mask),
            mask=mask,
        )


def rotary_store_kvcache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    pdl: int = 0,
) -> torch.Tensor:
    """positions: [T] int; q: [T, Hq, D], k, v: [T, Hkv, D] (strided views of the qkv projection
    are fine); tables: [max_pos, D] float32; caches: [slots, Hkv, D]; slot_mapping: [T] int32 or
    int64, -1 to skip a row. Rotates q in place and returns it; writes rotated k and v into the
    caches; k itself is left as it was. pdl: the launch mode (kernels/pdl.py)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and d % 2 == 0
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[1:] == (hkv, d)
    assert cos_table.stride(-1) == 1 and cos_table.stride() == sin_table.stride()
    assert positions.shape == slot_mapping.shape == (t,)
    if t:
        _rotary_store_kernel[(t,)](
            positions,
            slot_mapping,
            q,
            k,
            v,
            k_cache,
            v_cache,
            cos_table,
            sin_table,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            cos_table.stride(0),
            NUM_Q_HEADS=hq,
            NUM_KV_HEADS=hkv,
            HEAD_DIM=d,
            BLOCK_QH=triton.next_power_of_2(hq),
            BLOCK_KH=triton.next_power_of_2(hkv),
            BLOCK_D=triton.next_power_of_2(d),
            num_warps=4,
            **pdl_launch_args(pdl),
        )
    return q


def rotary_ref(
    positions: torch.Tensor, x: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor
) -> torch.Tensor:
    """labkit.layers.rotary's math (HF's): tables cast to x's dtype, math in that dtype."""
    cos = cos_table[positions].unsqueeze(1).to(x.dtype)
    sin = sin_table[positions].unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rotary_store_kvcache_ref(
    positions, q, k, v, cos_table, sin_table, k_cache, v_cache, slot_mapping
) -> torch.Tensor:
    q.copy_(rotary_ref(positions, q, cos_table, sin_table))
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots] = rotary_ref(positions, k, cos_table, sin_table)[keep]
    v_cache[slots] = v[keep]
    return q
