"""Write the step's new K/V into the paged cache by slot mapping.

Caches are `[num_blocks * block_size, num_kv_heads, head_dim]`: a flat slot axis, slot =
block_id * block_size + offset. One program per token copies that token's K and V rows (all KV
heads: one contiguous run of num_kv_heads * head_dim elements in the cache); slot -1 is padding
and is skipped, so a padded batch (CUDA graphs) needs no trimming.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(k, v, k_cache, v_cache, slot_mapping,
                          stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)  # int64: slot * stride can pass 2**31
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    dst = slot * stride_cs + h * stride_ch + d
    tl.store(k_cache + dst, tl.load(k + t * stride_kt + h * stride_kh + d, mask=mask), mask=mask)
    tl.store(v_cache + dst, tl.load(v + t * stride_vt + h * stride_vh + d, mask=mask), mask=mask)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (strided views of the qkv projection are fine); slot_mapping: [T] int32
    or int64, -1 to skip a row. Writes k_cache / v_cache in place."""
    t, h, d = k.shape
    assert k.stride(-1) == v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.shape[1:] == (h, d) and slot_mapping.shape == (t,)
    if t == 0:
        return
    _store_kvcache_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping,
                                k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                k_cache.stride(0), k_cache.stride(1),
                                NUM_HEADS=h, HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(h),
                                BLOCK_D=triton.next_power_of_2(d), num_warps=4)


def store_kvcache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots] = k[keep]
    v_cache[slots] = v[keep]
