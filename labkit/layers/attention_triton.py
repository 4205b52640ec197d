"""Triton attention backend: the same two methods as TorchAttentionBackend, on labkit_kernels.

`prepare` builds the step's int32 tensors (slot mapping; decode block table and context lengths;
prefill cu_seqlens, context lengths and block table) in ONE host buffer and copies it to the
device in one transfer; the tensors are views into it. `forward` stores the new K/V, then runs the
decode kernel on the leading single-token rows and the prefill kernel on the rest.
"""
from __future__ import annotations

import numpy as np
import torch

from labkit.layers.attention import AttentionMetadata, SeqSlice
from labkit_kernels.paged_attention_decode import paged_attention_decode
from labkit_kernels.prefill_attention import prefill_attention
from labkit_kernels.store_kvcache import store_kvcache


class TritonAttentionBackend:
    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def _block_table(self, seqs: list[SeqSlice]) -> np.ndarray:
        """[len(seqs), widest] int32, each row the blocks its context uses, zero-padded."""
        bs = self.block_size
        width = max(-(-s.ctx_len // bs) for s in seqs)
        table = np.zeros((len(seqs), width), dtype=np.int32)
        for i, s in enumerate(seqs):
            n = -(-s.ctx_len // bs)
            table[i, :n] = s.block_table[:n]
        return table

    def prepare(self, seqs: list[SeqSlice]) -> AttentionMetadata:
        bs = self.block_size
        # Decode rows come first (the scheduler orders them so); the kernel takes the leading run
        # of single-token rows, and any later one goes through the prefill kernel, which is
        # correct for q_len 1 too.
        n_dec = next((i for i, s in enumerate(seqs) if s.q_len != 1), len(seqs))
        dec, pre = seqs[:n_dec], seqs[n_dec:]
        slots = []
        for s in seqs:
            pos = np.arange(s.ctx_len - s.q_len, s.ctx_len)
            slots.append(np.asarray(s.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs)
        parts = {"slot_mapping": np.concatenate(slots)}
        if dec:
            parts["decode_context_lens"] = np.array([s.ctx_len for s in dec])
            parts["decode_block_table"] = self._block_table(dec)
        if pre:
            parts["prefill_cu_seqlens_q"] = np.cumsum([0] + [s.q_len for s in pre])
            parts["prefill_context_lens"] = np.array([s.ctx_len for s in pre])
            parts["prefill_block_table"] = self._block_table(pre)
        flat = np.concatenate([a.ravel() for a in parts.values()]).astype(np.int32)
        buf = torch.from_numpy(flat).to(self.device)
        views, start = {}, 0
        for name, a in parts.items():
            views[name] = buf[start:start + a.size].view(a.shape)
            start += a.size
        meta = AttentionMetadata(views.pop("slot_mapping"), n_dec, extra=views)
        if pre:
            meta.extra["prefill_max_q_len"] = max(s.q_len for s in pre)
        return meta

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        """q: [T, H, D]; k, v: [T, Hkv, D]; caches: [num_blocks * block_size, Hkv, D]."""
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        n, x = meta.num_decode, meta.extra
        if n:
            paged_attention_decode(q[:n], k_cache, v_cache, x["decode_block_table"],
                                   x["decode_context_lens"], scale, self.block_size, out=out[:n])
        if n < q.shape[0]:
            prefill_attention(q[n:], k_cache, v_cache, x["prefill_cu_seqlens_q"],
                              x["prefill_context_lens"], x["prefill_block_table"], scale,
                              self.block_size, x["prefill_max_q_len"], out=out[n:])
        return out
