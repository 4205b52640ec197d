"""Paged attention: one seam between the model and the attention implementation.

The model runner describes a step's batch as `SeqSlice`s; the backend's `prepare` turns them into
its own metadata once per step (shared by every layer), and `forward` applies the rotary
embedding, writes the new K/V into the paged cache by slot mapping and attends through each
sequence's block table. Rotary sits behind the seam because a backend may fuse it with the cache
write (the Triton one does: one kernel per layer instead of two).

What a forward needs (the backend, the step's metadata, the KV caches) travels down the model's
forward as `AttentionInputs`. A backend that CUDA graphs can replay also implements
`GraphCaptureBackend`'s hooks: static metadata buffers to capture over, and a per-step copy of a
batch into them. Backends: torch_backend (the reference, everywhere), triton_backend (CUDA).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from labkit.layers.norm import QKNorm
from labkit.layers.rotary import RotaryEmbedding


@dataclass
class SeqSlice:
    """One sequence's share of a step: `q_len` new tokens at the end of `ctx_len` tokens."""

    q_len: int
    ctx_len: int
    block_table: list[int]


def padded_block_table(tables: list[list[int]]) -> np.ndarray:
    """[len(tables), longest] int32, each row a table, zero-padded. One pass in C over all the
    ids (a row-by-row fill costs ~1 us a row: too much for a batch of 256 every step)."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    out = np.zeros((len(tables), int(lens.max(initial=0))), np.int32)
    out[np.arange(out.shape[1])[None, :] < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), np.int32, int(lens.sum())
    )
    return out


class AttentionBackend(Protocol):
    """Turns a step's batch into metadata (its own dataclass) and attends with it."""

    block_size: int

    def prepare(self, seqs: list[SeqSlice]) -> Any: ...

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: RotaryEmbedding,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        scale: float,
        window: int | None = None,
        qk_norm: QKNorm | None = None,
    ) -> torch.Tensor:
        """window: sliding-window attention, each query sees itself and the window - 1 keys
        before it; None: every key up to itself. qk_norm: per-head norms of q and k, applied
        before rotary."""


class GraphCaptureBackend(AttentionBackend, Protocol):
    """A backend whose decode steps CUDA graphs can capture and replay (engine/cuda_graphs.py).
    Captured kernels read the metadata from fixed addresses, so the backend owns static buffers
    for up to `max_bs` decode rows and copies each step's values into them before a replay."""

    def init_graph_buffers(self, max_bs: int, max_blocks: int) -> None:
        """Allocate the static buffers (padding rows: no KV write, nothing to attend)."""

    def graph_metadata(self, bs: int) -> Any:
        """Decode metadata for `bs` rows over the static buffers, to capture with."""

    def prepare_graph_replay(self, seqs: list[SeqSlice], bs: int) -> None:
        """Copy a decode step's `seqs` into the static buffers, padded to the captured `bs`."""


@dataclass
class AttentionInputs:
    """What every attention layer reads in one forward: the backend, the step's metadata (the
    backend's own type) and each layer's (K, V) cache."""

    backend: AttentionBackend
    meta: Any
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    profile_category = "attention"

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.rotary = rotary
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn: AttentionInputs,
        qk_norm: QKNorm | None = None,
    ) -> torch.Tensor:
        """q: [T, H, D], k and v: [T, Hkv, D], before rotary (and before `qk_norm`)."""
        k_cache, v_cache = attn.kv_caches[self.layer_idx]
        return attn.backend.forward(
            positions,
            q,
            k,
            v,
            self.rotary,
            k_cache,
            v_cache,
            attn.meta,
            self.scale,
            self.sliding_window,
            qk_norm,
        )
