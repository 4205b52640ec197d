"""CUDA graphs for decode steps. A decode step of a small batch is a few hundred short kernels;
launched one by one from Python it costs more than the kernels themselves. Graphs are captured
once at start for a ladder of batch sizes (1, 2, 4, then multiples of 8, as vLLM) over static
input buffers; a step copies its inputs into the buffers, pads to the next captured size and
replays. Padding rows write no KV (slot -1) and attend to nothing (context length 0)."""
from __future__ import annotations

import numpy as np
import torch

from labkit.layers.attention import (AttentionMetadata, ForwardContext, SeqSlice, forward_context,
                                     padded_block_table)


def batch_ladder(max_bs: int) -> list[int]:
    return [b for b in (1, 2, 4) if b < max_bs] + list(range(8, max_bs + 1, 8)) or [max_bs]


class DecodeGraphs:
    def __init__(self, model, backend, kv_caches, max_bs: int, max_blocks: int,
                 device: torch.device):
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.sizes = batch_ladder(max_bs)
        max_bs = self.sizes[-1]
        self.block_size = backend.block_size
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slots = torch.full((max_bs,), -1, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.hidden: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:bs], bs, extra={
            "decode_block_table": self.block_table[:bs], "decode_context_lens": self.context_lens[:bs]})

    def _forward(self, bs: int) -> torch.Tensor:
        with forward_context(ForwardContext(self.backend, self._meta(bs), self.kv_caches)):
            return self.model(self.input_ids[:bs], self.positions[:bs])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):          # largest first: the others reuse its memory
            self._forward(bs)                    # warm up: compile kernels, settle allocations
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(bs)
                if self.hidden is None:
                    self.hidden = torch.empty_like(out)
                self.hidden[:bs].copy_(out)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, seqs: list[SeqSlice]) -> bool:
        return len(seqs) <= self.sizes[-1] and all(s.q_len == 1 for s in seqs)

    def run(self, input_ids: list[int], positions: list[int], seqs: list[SeqSlice],
            pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`pending`: (rows, ids) of input tokens that are already on the device."""
        n = len(seqs)
        bs = next(b for b in self.sizes if b >= n)
        # Only as wide as this batch's longest table: the kernel never reads past a context's
        # blocks, so stale entries further right are harmless.
        table = padded_block_table([s.block_table for s in seqs])
        ctx = np.fromiter((s.ctx_len for s in seqs), np.int64, n)
        last = ctx - 1
        slots = table[np.arange(n), last // self.block_size].astype(np.int64) * self.block_size \
            + last % self.block_size
        # One pinned host tensor per dtype ([ids, positions]; [slots, context lengths], padded;
        # the block table): copies from pageable memory would wait for the queued steps.
        longs = torch.tensor([input_ids, positions], dtype=torch.long).pin_memory()
        ints = np.zeros((2, bs), np.int32)
        ints[0, n:] = -1
        ints[0, :n], ints[1, :n] = slots, ctx
        self.input_ids[:n].copy_(longs[0], non_blocking=True)
        self.positions[:n].copy_(longs[1], non_blocking=True)
        if pending is not None:
            self.input_ids[pending[0]] = pending[1]
        ints = torch.from_numpy(ints).pin_memory()
        self.slots[:bs].copy_(ints[0], non_blocking=True)
        self.context_lens[:bs].copy_(ints[1], non_blocking=True)
        self.block_table[:n, :table.shape[1]].copy_(torch.from_numpy(table).pin_memory(),
                                                    non_blocking=True)
        self.graphs[bs].replay()
        return self.hidden[:n]
