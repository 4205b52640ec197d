"""Continuous batching in vLLM V1's style: no prefill and decode phases. Each step, every running
request gets the tokens it still needs (one for a decode, a chunk of its prompt for a prefill)
under a token budget, running requests first, then waiting ones; a long prompt is split across
steps (chunked prefill). When KV blocks run out, the lowest-ranked running request is preempted
and later recomputed from its tokens so far (its cached blocks usually survive, so the recompute
is mostly prefix-cache hits).

Async scheduling: a running request may have one token sampled on the device that the host has
not seen yet (`num_pending`). It counts as a token to compute, so the request decodes again at
once; a request that this token will end by length is not scheduled again; and a preempted
request waits until its token lands before it is readmitted.

Rank: with policy "fcfs", arrival order; with "priority", (priority, arrival): a lower value is
served first, and a waiting request may preempt running requests ranked below it.

`launch_work` turns a scheduled batch into the forward pass's per-sequence work.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from labkit.engine.block_manager import BlockManager
from labkit.engine.model_runner import SeqWork
from labkit.engine.request import Request, RequestStatus
from labkit.engine.resolved_config import ResolvedConfig

POLICIES = ("fcfs", "priority")


@dataclass
class ScheduledBatch:
    work: list[tuple[Request, int]]  # (request, tokens to compute this step); 1-token rows first
    num_preempted: int = 0
    # Counted when scheduled: after the step the requests have moved on.
    num_prefill_tokens: int = 0
    num_decode: int = 0

    def __post_init__(self) -> None:
        for req, n in self.work:
            # A decode computes the one token it sampled last step; a 1-token prompt or last
            # prompt chunk is still prefill.
            total = req.num_tokens + req.num_pending
            if n == 1 and req.num_computed_tokens + 1 == total and total > req.num_prompt_tokens:
                self.num_decode += 1
            else:
                self.num_prefill_tokens += n


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        policy: str = "fcfs",
        max_model_len: int | None = None,
    ):
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.policy = policy
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._order = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache at admission
        self.prefix_hits = 0  # of which were found there

    @classmethod
    def from_config(cls, config: ResolvedConfig, num_blocks: int) -> Scheduler:
        """The engine's: over a fresh BlockManager of `num_blocks` blocks, with its options."""
        return cls(
            BlockManager(num_blocks, config.block_size, config.enable_prefix_caching),
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
            config.scheduling_policy,
            config.max_model_len,
        )

    # A request's rank never changes once added: kept on it, read by a C-level key function (the
    # running batch is sorted every step; a Python key costs ~1 us a request).
    _rank = staticmethod(operator.attrgetter("sched_key"))

    def add(self, req: Request) -> None:
        req.order, self._order = self._order, self._order + 1
        prio = req.priority if self.policy == "priority" else 0
        req.sched_key = (prio, req.arrival_time, req.order)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        work: list[tuple[Request, int]] = []
        preempted = 0

        def preempt_lowest() -> Request:
            nonlocal budget, preempted
            victim = max(self.running, key=self._rank)
            for i, (r, n) in enumerate(work):
                if r is victim:
                    del work[i]
                    budget += n
                    break
            self._preempt(victim)
            preempted += 1
            return victim

        for req in sorted(self.running, key=self._rank):
            if req.status != RequestStatus.RUNNING or budget == 0 or self._ends_on_pending(req):
                continue
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            while not self.bm.can_allocate(req, n):
                if preempt_lowest() is req:
                    break
            if req.status == RequestStatus.RUNNING:
                self.bm.allocate(req, n)
                work.append((req, n))
                budget -= n
        self.waiting.sort(key=self._rank)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:  # preempted with a token in flight: readmitted once it lands
                break
            cached = self.bm.match_prefix(req)
            remaining = req.num_tokens - req.num_computed_tokens
            n = min(remaining, budget)
            fits = self.bm.can_allocate(req, n)
            while (
                not fits
                and self.policy == "priority"
                and self.running
                and self._rank(max(self.running, key=self._rank)) > self._rank(req)
            ):
                preempt_lowest()
                fits = self.bm.can_allocate(req, n)
            if (n < remaining and not self.chunked) or not fits:
                self._release(req)
                break
            self.waiting.pop(0)
            if self.bm.caching and not req.skip_prefix_cache:
                self.prefix_queries += (
                    (req.num_tokens - 1) // self.bm.block_size * self.bm.block_size
                )
                self.prefix_hits += cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self.bm.allocate(req, n)
            work.append((req, n))
            budget -= n
        # Single-token rows first: the attention backend batches them as decodes.
        work.sort(key=lambda rn: rn[1] != 1)
        return ScheduledBatch(work, preempted)

    def _ends_on_pending(self, req: Request) -> bool:
        """The token in flight will finish the request by length: nothing more to compute."""
        if not req.num_pending:
            return False
        total = req.num_tokens + req.num_pending
        max_tokens = req.params.max_tokens
        return (self.max_model_len is not None and total >= self.max_model_len) or (
            max_tokens is not None and total - req.num_prompt_tokens >= max_tokens
        )

    def _release(self, req: Request) -> None:
        """Give back blocks a waiting request holds (its prefix-cache matches) and its progress."""
        self.bm.free(req)
        req.num_computed_tokens = 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.bm.free(req)
        req.status = RequestStatus.FINISHED


def launch_work(batch: ScheduledBatch, call_start: float) -> list[SeqWork]:
    """The forward pass's work for a scheduled batch. Advances the requests' computed counts
    (the next schedule may run before this step completes) and stamps first scheduling."""
    # The block tables are read (or pickled to the TP workers) while the step is launched,
    # before the scheduler touches them again: no copies.
    work = []
    for r, n in batch.work:
        c = r.num_computed_tokens
        ids = r.token_ids[c : c + n]
        pending_row = -1
        if len(ids) < n:  # the last input token was sampled last step: still on the device
            ids.append(0)
            pending_row = r.pending_row
        work.append(
            SeqWork(
                ids,
                c,
                r.block_table,
                sample=c + n == r.num_tokens + r.num_pending,
                all_logits=r.prompt_logprobs is not None and c < r.num_prompt_tokens,
                pending_row=pending_row,
            )
        )
        r.num_computed_tokens = c + n
        if r.metrics.first_scheduled_time is None:
            r.metrics.first_scheduled_time = call_start
            r.metrics.time_in_queue = call_start - r.metrics.arrival_time
    return work
