"""Continuous batching: token budgets, chunked prefill, decode rows first, preemption and
priorities, on the scheduler alone (no model)."""

from __future__ import annotations

from labkit.engine.block_manager import BlockManager
from labkit.engine.request import Request, RequestStatus
from labkit.engine.scheduler import Scheduler
from labkit.sampling_params import SamplingParams


def request(n: int, rid: str, priority: int = 0, arrival: float = 0.0) -> Request:
    return Request(
        rid,
        rid,
        0,
        None,
        list(range(1, n + 1)),
        SamplingParams(max_tokens=100),
        priority=priority,
        arrival_time=arrival,
    )


def run_step(sched: Scheduler):
    """Schedule, then pretend the step computed everything and sampled one token per finished
    prompt (as the engine does after a forward)."""
    batch = sched.schedule()
    for r, n in batch.work:
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.token_ids.append(7)
    return batch


def test_a_long_prompt_is_prefilled_in_chunks_under_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    r = request(25, "long")
    sched.add(r)
    sizes = [run_step(sched).work[0][1] for _ in range(3)]
    assert sizes == [10, 10, 5]
    assert run_step(sched).work == [(r, 1)]  # then it decodes


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_that_holds_it_whole():
    sched = Scheduler(
        BlockManager(64, 4), 8, max_num_batched_tokens=10, enable_chunked_prefill=False
    )
    sched.add(request(25, "long"))
    assert run_step(sched).work == []


def test_decode_rows_come_first_and_the_budget_is_shared():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=12)
    a = request(5, "a")
    sched.add(a)
    run_step(sched)  # a's prompt done: a decodes from now on
    b = request(20, "b")
    sched.add(b)
    batch = run_step(sched)
    assert batch.work[0] == (a, 1) and batch.work[1] == (b, 11)
    assert batch.num_decode == 1 and batch.num_prefill_tokens == 11


def test_max_num_seqs_caps_the_running_set():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(request(3, f"r{i}"))
    assert len(run_step(sched).work) == 2 and len(sched.waiting) == 1


def test_when_blocks_run_out_the_latest_admitted_request_is_preempted():
    sched = Scheduler(BlockManager(4, 2), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = request(3, "a", arrival=1.0), request(3, "b", arrival=2.0)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # prompts: 2 blocks each, the cache is full
    run_step(sched)  # the 4th tokens still fit
    batch = run_step(sched)  # a's 5th token needs a third block
    assert batch.num_preempted == 1
    assert b.status == RequestStatus.WAITING and b.block_table == [] and b.num_preemptions == 1
    assert [r for r, _ in batch.work] == [a]


def test_priority_policy_lets_an_urgent_request_preempt_a_lower_one():
    sched = Scheduler(
        BlockManager(2, 2), max_num_seqs=8, max_num_batched_tokens=100, policy="priority"
    )
    low = request(3, "low", priority=5, arrival=1.0)
    sched.add(low)
    run_step(sched)
    urgent = request(3, "urgent", priority=0, arrival=2.0)
    sched.add(urgent)
    batch = run_step(sched)
    assert [r for r, _ in batch.work] == [urgent]
    assert low.status == RequestStatus.WAITING


def test_finish_frees_blocks_whether_running_or_waiting():
    bm = BlockManager(8, 2)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    a, b = request(3, "a"), request(3, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched.finish(a)
    sched.finish(b)
    assert not sched.has_work() and bm.num_free == 8
    assert a.finished and b.finished
