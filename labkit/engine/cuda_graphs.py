"""CUDA graphs for decode steps. A decode step of a small batch is a few hundred short kernels;
launched one by one from Python it costs more than the kernels themselves. Graphs are captured
once at start for a ladder of batch sizes (1, 2, 4, then multiples of 8, as vLLM) over static
input buffers; a step copies its inputs into the buffers, pads to the next captured size and
replays. Padding rows write no KV and attend to nothing.

This module owns the graphs, the static input ids / positions and the hidden-state output; the
attention backend owns its static metadata (GraphCaptureBackend's hooks) and fills it per step.
"""

from __future__ import annotations

import torch
from torch import nn

from labkit.layers.attention import AttentionInputs, GraphCaptureBackend, SeqSlice


def batch_ladder(max_bs: int) -> list[int]:
    return [b for b in (1, 2, 4) if b < max_bs] + list(range(8, max_bs + 1, 8)) or [max_bs]


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        backend: GraphCaptureBackend,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_bs: int,
        max_blocks: int,
        device: torch.device,
    ):
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.sizes = batch_ladder(max_bs)
        max_bs = self.sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        backend.init_graph_buffers(max_bs, max_blocks)
        self.hidden: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _forward(self, bs: int) -> torch.Tensor:
        attn = AttentionInputs(self.backend, self.backend.graph_metadata(bs), self.kv_caches)
        return self.model(self.input_ids[:bs], self.positions[:bs], attn)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first: the others reuse its memory
            self._forward(bs)  # warm up: compile kernels, settle allocations
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

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        seqs: list[SeqSlice],
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`pending`: (rows, ids) of input tokens that are already on the device."""
        n = len(seqs)
        bs = next(b for b in self.sizes if b >= n)
        # One pinned host tensor for [ids, positions]: copies from pageable memory would wait
        # for the queued steps.
        longs = torch.tensor([input_ids, positions], dtype=torch.long).pin_memory()
        self.input_ids[:n].copy_(longs[0], non_blocking=True)
        self.positions[:n].copy_(longs[1], non_blocking=True)
        if pending is not None:
            self.input_ids[pending[0]] = pending[1]
        self.backend.prepare_graph_replay(seqs, bs)
        self.graphs[bs].replay()
        return self.hidden[:n]
