"""Triton attention backend (CUDA): the same seam as TorchAttentionBackend, on labkit.kernels, plus
the hooks that let CUDA graphs replay its decode steps.

`prepare` builds the step's int32 tensors (slot mapping; decode block table and context lengths;
prefill cu_seqlens, context lengths and block table) in ONE host buffer and copies it to the
device in one transfer (from pinned memory: it never waits for queued work); the tensors are
16-byte-aligned views into it. `forward` rotates q and stores the rotated K and V in one kernel
(which also applies Qwen3's per-head q/k norms), then runs the decode kernel on the leading
single-token rows and the prefill kernel on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labkit.kernels.paged_attention_decode import paged_attention_decode
from labkit.kernels.prefill_attention import prefill_attention
from labkit.kernels.rotary_store_kvcache import rotary_store_kvcache
from labkit.layers.attention import SeqSlice, padded_block_table
from labkit.layers.norm import QKNorm
from labkit.layers.rotary import RotaryEmbedding
from labkit.layers.switches import KernelSwitches
from labkit.transfer import array_to_device

ALIGN = 4  # int32 elements: 16 bytes


@dataclass
class TritonAttentionMetadata:
    """A step's int32 tensors. Decode rows come first, then the prefill (q_len > 1) rows."""

    slot_mapping: torch.Tensor  # [T] cache slot per new token, -1: none
    num_decode: int
    decode_block_table: torch.Tensor | None = None  # [B_dec, W]
    decode_context_lens: torch.Tensor | None = None  # [B_dec]
    prefill_cu_seqlens_q: torch.Tensor | None = None  # [B_pre + 1]
    prefill_context_lens: torch.Tensor | None = None  # [B_pre]
    prefill_block_table: torch.Tensor | None = None  # [B_pre, W]
    prefill_max_q_len: int = 0  # a host int: it sizes the prefill grid


@dataclass
class _GraphBuffers:
    """Static decode metadata that captured graphs read (padding rows: slot -1, length 0)."""

    slots: torch.Tensor  # [max_bs] int32
    context_lens: torch.Tensor  # [max_bs] int32
    block_table: torch.Tensor  # [max_bs, max_blocks] int32


class TritonAttentionBackend:
    def __init__(self, block_size: int, device: torch.device, switches: KernelSwitches):
        self.block_size = block_size
        self.device = device
        self.switches = switches
        self.graph_buffers: _GraphBuffers | None = None

    def _block_table(self, seqs: list[SeqSlice]) -> np.ndarray:
        """[len(seqs), widest] int32, each row the blocks its context uses, zero-padded."""
        bs = self.block_size
        return padded_block_table([s.block_table[: -(-s.ctx_len // bs)] for s in seqs])

    def prepare(self, seqs: list[SeqSlice]) -> TritonAttentionMetadata:
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
            flat[start : start + a.size] = a.ravel()
        buf = array_to_device(flat, self.device)
        views = {
            name: buf[start : start + a.size].view(a.shape)
            for start, (name, a) in zip(starts, parts.items())
        }
        return TritonAttentionMetadata(
            num_decode=n_dec, prefill_max_q_len=max((s.q_len for s in pre), default=0), **views
        )

    def forward(
        self,
        positions,
        q,
        k,
        v,
        rotary: RotaryEmbedding,
        k_cache,
        v_cache,
        meta: TritonAttentionMetadata,
        scale: float,
        window: int | None = None,
        qk_norm: QKNorm | None = None,
    ):
        """positions: [T]; q: [T, H, D]; k, v: [T, Hkv, D] (before rotary); caches:
        [num_blocks * block_size, Hkv, D]; window: sliding window (None: full attention);
        qk_norm: per-head norms of q and k before rotary. q is normalised and rotated in place."""
        pdl = self.switches.pdl
        norm = {}
        if qk_norm is not None:
            norm = dict(
                q_norm_weight=qk_norm.q.weight,
                k_norm_weight=qk_norm.k.weight,
                norm_eps=qk_norm.q.eps,
            )
        rotary_store_kvcache(
            positions,
            q,
            k,
            v,
            rotary.cos,
            rotary.sin,
            k_cache,
            v_cache,
            meta.slot_mapping,
            pdl=pdl,
            **norm,
        )
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        n = meta.num_decode
        if n:
            paged_attention_decode(
                q[:n],
                k_cache,
                v_cache,
                meta.decode_block_table,
                meta.decode_context_lens,
                scale,
                self.block_size,
                out=out[:n],
                window=window,
                pdl=pdl,
            )
        if n < q.shape[0]:
            prefill_attention(
                q[n:],
                k_cache,
                v_cache,
                meta.prefill_cu_seqlens_q,
                meta.prefill_context_lens,
                meta.prefill_block_table,
                scale,
                self.block_size,
                meta.prefill_max_q_len,
                out=out[n:],
                pdl=pdl,
                window=window,
            )
        return out

    # CUDA graph hooks (GraphCaptureBackend)

    def init_graph_buffers(self, max_bs: int, max_blocks: int) -> None:
        dev = self.device
        self.graph_buffers = _GraphBuffers(
            slots=torch.full((max_bs,), -1, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(max_bs, dtype=torch.int32, device=dev),
            block_table=torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev),
        )

    def graph_metadata(self, bs: int) -> TritonAttentionMetadata:
        g = self.graph_buffers
        return TritonAttentionMetadata(
            g.slots[:bs],
            bs,
            decode_block_table=g.block_table[:bs],
            decode_context_lens=g.context_lens[:bs],
        )

    def prepare_graph_replay(self, seqs: list[SeqSlice], bs: int) -> None:
        g, n, block = self.graph_buffers, len(seqs), self.block_size
        # Only as wide as this batch's longest table: the kernel never reads past a context's
        # blocks, so stale entries further right are harmless.
        table = padded_block_table([s.block_table for s in seqs])
        ctx = np.fromiter((s.ctx_len for s in seqs), np.int64, n)
        last = ctx - 1
        slots = table[np.arange(n), last // block].astype(np.int64) * block + last % block
        # One pinned host tensor for [slots, context lengths], padded to bs, and one for the
        # block table: copies from pageable memory would wait for the queued steps.
        ints = np.zeros((2, bs), np.int32)
        ints[0, n:] = -1
        ints[0, :n], ints[1, :n] = slots, ctx
        ints = torch.from_numpy(ints).pin_memory()
        g.slots[:bs].copy_(ints[0], non_blocking=True)
        g.context_lens[:bs].copy_(ints[1], non_blocking=True)
        g.block_table[:n, : table.shape[1]].copy_(
            torch.from_numpy(table).pin_memory(), non_blocking=True
        )
