"""Paged attention: one seam between the model and the attention implementation.

The model runner describes a step's batch as `SeqSlice`s; the backend's `prepare` turns them into
metadata once per step (shared by every layer), and `forward` applies the rotary embedding,
writes the new K/V into the paged cache by slot mapping and attends through each sequence's block
table. Rotary sits behind the seam because a backend may fuse it with the cache write (the Triton
one does: one kernel per layer instead of two). The torch reference runs
everywhere; the Triton backend (CUDA) plugs in behind the same two methods.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit.layers.rotary import RotaryEmbedding


@dataclass
class SeqSlice:
    """One sequence's share of a step: `q_len` new tokens at the end of `ctx_len` tokens."""
    q_len: int
    ctx_len: int
    block_table: list[int]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                  # [T] cache slot of each new token
    num_decode: int                             # decode rows come first, one token each
    decode_blocks: torch.Tensor | None = None   # [B, W] block ids of each decode context
    decode_mask: torch.Tensor | None = None     # [B, 1, 1, W * block_size] True where real
    prefills: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)
    # (first row, q_len, ctx_len, block ids) for each sequence with q_len > 1
    extra: dict = field(default_factory=dict)   # backend-specific tensors


def padded_block_table(tables: list[list[int]]) -> np.ndarray:
    """[len(tables), longest] int32, each row a table, zero-padded. One pass in C over all the
    ids (a row-by-row fill costs ~1 us a row: too much for a batch of 256 every step)."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    out = np.zeros((len(tables), int(lens.max(initial=0))), np.int32)
    out[np.arange(out.shape[1])[None, :] < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), np.int32, int(lens.sum()))
    return out


class AttentionBackend(Protocol):
    block_size: int

    def prepare(self, seqs: list[SeqSlice]) -> AttentionMetadata: ...

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rotary: RotaryEmbedding, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Reference backend: gathers K/V through the block table, whole blocks at a time
    (index_select of block_size-token rows, far cheaper than a gather per token), and calls SDPA."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def prepare(self, seqs: list[SeqSlice]) -> AttentionMetadata:
        bs = self.block_size
        slots, decode, prefills, row = [], [], [], 0
        for s in seqs:
            nblk = -(-s.ctx_len // bs)
            slots.extend(s.block_table[p // bs] * bs + p % bs for p in range(s.ctx_len - s.q_len, s.ctx_len))
            if s.q_len == 1:
                decode.append((s.block_table[:nblk], s.ctx_len))
            else:
                prefills.append((row, s.q_len, s.ctx_len,
                                 torch.tensor(s.block_table[:nblk], device=self.device)))
            row += s.q_len
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=self.device),
                                 len(decode), prefills=prefills)
        if decode:
            width = max(len(b) for b, _ in decode)
            meta.decode_blocks = torch.tensor([b + [0] * (width - len(b)) for b, _ in decode],
                                              device=self.device)
            lens = torch.tensor([n for _, n in decode], device=self.device)
            meta.decode_mask = (torch.arange(width * bs, device=self.device) < lens[:, None])[:, None, None, :]
        return meta

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[*blocks.shape, block_size, Hkv, D] -> tokens flattened: [..., n * block_size, Hkv, D]."""
        hkv, d = cache.shape[1:]
        out = cache.view(-1, self.block_size, hkv, d).index_select(0, blocks.reshape(-1))
        return out.view(*blocks.shape[:-1], -1, hkv, d)

    def forward(self, positions, q, k, v, rotary: RotaryEmbedding, k_cache, v_cache,
                meta: AttentionMetadata, scale: float):
        """positions: [T]; q: [T, H, D]; k, v: [T, Hkv, D] (before rotary); caches:
        [num_blocks * block_size, Hkv, D]."""
        q, k = rotary(positions, q, k)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        n, h, d = meta.num_decode, q.shape[1], q.shape[2]
        hkv = k.shape[1]
        if n:
            # Grouped queries as the "length" axis: one SDPA call, no K/V repeat for GQA.
            qq = q[:n].view(n, hkv, h // hkv, d)
            kk = self._gather(k_cache, meta.decode_blocks).transpose(1, 2)
            vv = self._gather(v_cache, meta.decode_blocks).transpose(1, 2)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=meta.decode_mask, scale=scale)
            out[:n] = o.reshape(n, h, d)
        for row, q_len, ctx, blocks in meta.prefills:
            qq = q[row:row + q_len].transpose(0, 1).unsqueeze(0)
            kk = self._gather(k_cache, blocks)[:ctx].transpose(0, 1).unsqueeze(0)
            vv = self._gather(v_cache, blocks)[:ctx].transpose(0, 1).unsqueeze(0)
            if ctx == q_len:
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale,
                                                   enable_gqa=True)
            else:  # a chunk after cached tokens: query i sees keys up to ctx - q_len + i
                mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale,
                                                   enable_gqa=True)
            out[row:row + q_len] = o[0].transpose(0, 1)
        return out


# The forward context: the model runner enters it around `model.forward`, and every attention
# layer reads the step's metadata and backend from it (mini-sglang's pattern), so the model's
# signature stays (input_ids, positions).
@dataclass
class ForwardContext:
    backend: AttentionBackend
    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]


_ctx: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext):
    global _ctx
    prev, _ctx = _ctx, ctx
    try:
        yield ctx
    finally:
        _ctx = prev


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding):
        super().__init__()
        self.layer_idx = layer_idx
        self.rotary = rotary
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k and v: [T, Hkv, D], before rotary."""
        ctx = _ctx
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        return ctx.backend.forward(positions, q, k, v, self.rotary, k_cache, v_cache, ctx.meta,
                                   self.scale)
