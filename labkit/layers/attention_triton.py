"""Triton attention backend: the same two methods as TorchAttentionBackend, on labkit.kernels.

`prepare` builds the step's int32 tensors (slot mapping; decode block table and context lengths;
prefill cu_seqlens, context lengths and block table) in ONE host buffer and copies it to the
device in one transfer (from pinned memory: it never waits for queued work); the tensors are
16-byte-aligned views into it. `forward` rotates q and stores the rotated K and V in one kernel,
then runs the decode kernel on the leading single-token rows and the prefill kernel on the rest.
"""
from __future__ import annotations

import numpy as np
import torch

from labkit.layers.attention import AttentionMetadata, SeqSlice, padded_block_table
from labkit.layers.rotary import RotaryEmbedding
from labkit.transfer import array_to_device
from labkit.kernels.paged_attention_decode import paged_attention_decode
from labkit.kernels.prefill_attention import prefill_attention
from labkit.kernels.rotary_store_kvcache import rotary_store_kvcache


ALIGN = 4  # int32 elements: 16 bytes


class TritonAttentionBackend:
    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def _block_table(self, seqs: list[SeqSlice]) -> np.ndarray:
        """[len(seqs), widest] int32, each row the blocks its context uses, zero-padded."""
        bs = self.block_size
        return padded_block_table([s.block_table[:-(-s.ctx_len // bs)] for s in seqs])

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
        # Each part starts 16-byte aligned: Triton specialises pointer arguments on their
        # alignment, and a misaligned view would compile a new kernel variant mid-run (~1 s).
        starts = np.cumsum([0] + [-(-a.size // ALIGN) * ALIGN for a in parts.values()])
        flat = np.zeros(starts[-1], np.int32)
        for start, a in zip(starts, parts.values()):
            flat[start:start + a.size] = a.ravel()
        buf = array_to_device(flat, self.device)
        views = {name: buf[start:start + a.size].view(a.shape)
                 for start, (name, a) in zip(starts, parts.items())}
        meta = AttentionMetadata(views.pop("slot_mapping"), n_dec, extra=views)
        if pre:
            meta.extra["prefill_max_q_len"] = max(s.q_len for s in pre)
        return meta

    def forward(self, positions, q, k, v, rotary: RotaryEmbedding, k_cache, v_cache,
                meta: AttentionMetadata, scale: float):
        """positions: [T]; q: [T, H, D]; k, v: [T, Hkv, D] (before rotary); caches:
        [num_blocks * block_size, Hkv, D]. q is rotated in place."""
        rotary_store_kvcache(positions, q, k, v, rotary.cos, rotary.sin, k_cache, v_cache,
                             meta.slot_mapping)
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
