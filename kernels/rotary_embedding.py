"""Rotary position embedding, neox/HF "rotate half" layout, applied to q and k in place.

For each head, with x = [x1, x2] split in halves: out = [x1*cos - x2*sin, x2*cos + x1*sin]. The
tables are cos/sin of cat(freqs, freqs), so their two halves are equal and only the first is read.
One program rotates all heads of q and k for one token (the position is looked up once); the math
runs in float32 and rounds once to q's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x, t, stride_t, stride_h, cos, sin,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    p1 = x + t * stride_t + h * stride_h + d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(positions, q, k, cos_table, sin_table,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_table,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_table + pos * stride_table + d, mask=d < HALF, other=0.0)[None, :]
    sin = tl.load(sin_table + pos * stride_table + d, mask=d < HALF, other=0.0)[None, :]
    _rotate_heads(q, t, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k, t, stride_kt, stride_kh, cos, sin, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_table: torch.Tensor, sin_table: torch.Tensor):
    """positions: [T] int; q: [T, Hq, D], k: [T, Hk, D] (strided views of the qkv projection
    are fine: they are rotated in place); tables: [max_pos, D] float32. Returns (q, k)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and d % 2 == 0
    assert cos_table.stride(-1) == 1 and cos_table.stride() == sin_table.stride()
    if t:
        _rotary_kernel[(t,)](positions, q, k, cos_table, sin_table,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             cos_table.stride(0),
                             NUM_Q_HEADS=hq, NUM_K_HEADS=hk, HALF=d // 2,
                             BLOCK_QH=triton.next_power_of_2(hq),
                             BLOCK_KH=triton.next_power_of_2(hk),
                             BLOCK_HALF=triton.next_power_of_2(d // 2), num_warps=4)
    return q, k


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_table: torch.Tensor, sin_table: torch.Tensor):
    """labkit.layers.rotary's math (HF's): tables cast to q's dtype, math in that dtype."""
    cos = cos_table[positions].unsqueeze(1).to(q.dtype)
    sin = sin_table[positions].unsqueeze(1).to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    return rotate(q), rotate(k)
