"""Rotary embedding and the KV-cache write in one kernel: q is rotated in place, k is rotated on
its way into the paged cache, v is copied there, all by slot mapping. Optionally each q and k head
is RMS-normalised first (Qwen3's q_norm / k_norm: one weight [head_dim] shared by all heads).

One launch instead of two per layer (the rotated k is needed only in the cache: every attention
kernel reads K through the block table, the new tokens' K included). Rotary is the neox/HF
"rotate half" layout: for each head, with x = [x1, x2] split in halves,
out = [x1*cos - x2*sin, x2*cos + x1*sin]; the tables are cos/sin of cat(freqs, freqs), so their
two halves are equal and only the first is read. Math in float32, one rounding to q's dtype.
The head norm rounds where labkit.kernels.fused_add_rmsnorm rounds (normalised, then scaled), so
the result is what that kernel followed by this one gave, two launches fewer per layer.

Caches are `[num_blocks * block_size, num_kv_heads, head_dim]`: a flat slot axis, slot =
block_id * block_size + offset. One program per token: the position and slot are looked up once
for all its heads. Slot -1 is padding (CUDA graphs pad the batch): its K/V are not stored. A
cache may be float8_e4m3fn (`kv_cache_dtype="fp8"`, scale 1.0): K and V are rounded to it from
float32, saturating.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_add_rmsnorm import rmsnorm_ref
from .pdl import pdl_launch_args, pdl_wait


@triton.jit
def _head_rmsnorm(x1, x2, weight, d, HALF: tl.constexpr, eps, dtype: tl.constexpr):
    """RMSNorm of each row (head) of [x1 | x2] (float32, zeros past HALF) with `weight` [2 * HALF],
    rounded to `dtype` after normalising and after scaling, as HF and fused_add_rmsnorm round."""
    inv = tl.math.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(weight + d, mask=d < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(weight + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    x1 = ((x1 * inv).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    x2 = ((x2 * inv).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    return x1, x2


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
    norm_weight,
    eps,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    NORM: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    p1 = src + t_src + h * stride_sh + d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = _head_rmsnorm(x1, x2, norm_weight, d, HALF, eps, src.dtype.element_ty)
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
    q_norm_weight,
    k_norm_weight,
    eps,
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
    QK_NORM: tl.constexpr,
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
        q_norm_weight,
        eps,
        NUM_Q_HEADS,
        HEAD_DIM // 2,
        BLOCK_QH,
        BLOCK_D // 2,
        QK_NORM,
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
            k_norm_weight,
            eps,
            NUM_KV_HEADS,
            HEAD_DIM // 2,
            BLOCK_KH,
            BLOCK_D // 2,
            QK_NORM,
        )
        h = tl.arange(0, BLOCK_KH)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        val = tl.load(v + t * stride_vt + h * stride_vh + d, mask=mask).to(tl.float32)
        # Rounded to the cache's dtype (saturating to float8_e4m3fn for an FP8 cache).
        tl.store(
            v_cache + slot * stride_cs + h * stride_ch + d,
            val.to(v_cache.dtype.element_ty),
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
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
) -> torch.Tensor:
    """positions: [T] int; q: [T, Hq, D], k, v: [T, Hkv, D] (strided views of the qkv projection
    are fine); tables: [max_pos, D] float32; caches: [slots, Hkv, D]; slot_mapping: [T] int32 or
    int64, -1 to skip a row. Rotates q in place and returns it; writes rotated k and v into the
    caches; k itself is left as it was. With norm weights ([D] each, both or neither) every q and
    k head is RMS-normalised (epsilon `norm_eps`) before it is rotated. pdl: the launch mode
    (kernels/pdl.py)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and d % 2 == 0
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[1:] == (hkv, d)
    assert cos_table.stride(-1) == 1 and cos_table.stride() == sin_table.stride()
    assert positions.shape == slot_mapping.shape == (t,)
    qk_norm = q_norm_weight is not None
    assert qk_norm == (k_norm_weight is not None)
    if qk_norm:
        assert q_norm_weight.shape == k_norm_weight.shape == (d,)
        assert q_norm_weight.is_contiguous() and k_norm_weight.is_contiguous()
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
            q_norm_weight if qk_norm else q,  # never read without QK_NORM
            k_norm_weight if qk_norm else k,
            norm_eps,
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
            QK_NORM=qk_norm,
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
    positions,
    q,
    k,
    v,
    cos_table,
    sin_table,
    k_cache,
    v_cache,
    slot_mapping,
    *,
    q_norm_weight=None,
    k_norm_weight=None,
    norm_eps=0.0,
) -> torch.Tensor:
    if q_norm_weight is not None:
        q.copy_(rmsnorm_ref(q, q_norm_weight, norm_eps))
        k = rmsnorm_ref(k, k_norm_weight, norm_eps)
    q.copy_(rotary_ref(positions, q, cos_table, sin_table))
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots] = rotary_ref(positions, k, cos_table, sin_table)[keep].to(k_cache.dtype)
    v_cache[slots] = v[keep].to(v_cache.dtype)
    return q
