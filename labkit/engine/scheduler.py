"""Continuous batching in vLLM V1's style: no prefill and decode phases. Each step, every running
request gets the tokens it still needs (one for a decode, a chunk of its prompt for a prefill)
under a token budget, running requests first, then waiting ones; a long prompt is split across
steps (chunked prefill). When KV blocks run out, the most recently admitted request is preempted
and later recomputed from its tokens so far."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from labkit.engine.block_manager import BlockManager
from labkit.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    work: list[tuple[Request, int]]  # (request, tokens to compute this step); decodes first
    num_preempted: int = 0

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for r, n in self.work if not _is_decode(r, n))

    @property
    def num_decode(self) -> int:
        return sum(1 for r, n in self.work if _is_decode(r, n))


def _is_decode(req: Request, n: int) -> bool:
    return n == 1 and req.num_computed_tokens + 1 == req.num_tokens and req.num_output_tokens > 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        work: list[tuple[Request, int]] = []
        preempted = 0
        for req in list(self.running):
            if req.status != RequestStatus.RUNNING or budget == 0:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.bm.can_allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            if req.status == RequestStatus.RUNNING:
                self.bm.allocate(req, n)
                work.append((req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed_tokens
            n = min(remaining, budget)
            if (n < remaining and not self.chunked) or not self.bm.can_allocate(req, n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self.bm.allocate(req, n)
            work.append((req, n))
            budget -= n
        # Single-token rows first: the attention backend batches them as decodes.
        work.sort(key=lambda rn: rn[1] != 1)
        return ScheduledBatch(work, preempted)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.bm.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.bm.free(req)
        req.status = RequestStatus.FINISHED
