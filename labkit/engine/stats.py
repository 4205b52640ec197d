"""The engine's read-only surface for its neighbours (the server's metrics, the benchmarks, the
lab, tests): `LLMEngine.stats()` returns an `EngineStats` snapshot, `LLMEngine.step_records()`
the recent steps' records, which a `StepHistory` keeps; `step_record` builds one step's record."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from labkit.engine.block_manager import BlockManager
from labkit.engine.scheduler import ScheduledBatch, Scheduler
from labkit.observe.step_log import StepRecord

# A server runs for days: only the most recent steps' records are kept.
MAX_STEP_RECORDS = 200_000


@dataclass(frozen=True)
class EngineStats:
    num_steps: int  # steps completed so far: the number the next step record gets
    num_running: int  # sequences being scheduled
    num_waiting: int  # sequences queued (new or preempted)
    num_unfinished_requests: int  # parent requests added and not yet returned finished or aborted
    kv_blocks_used: int
    kv_blocks_total: int
    last_step: StepRecord | None  # the latest step's record; None before the first step

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of KV blocks in use, in [0, 1]."""
        return self.kv_blocks_used / self.kv_blocks_total


class StepHistory:
    """The records of the most recent `maxlen` steps, and the count of every step so far."""

    def __init__(self, maxlen: int = MAX_STEP_RECORDS):
        self._records: deque[StepRecord] = deque(maxlen=maxlen)
        self.num_steps = 0

    def add(self, record: StepRecord) -> None:
        self._records.append(record)
        self.num_steps += 1

    @property
    def last(self) -> StepRecord | None:
        return self._records[-1] if self._records else None

    def since(self, step: int) -> list[StepRecord]:
        """The kept records of steps `step` and later, in order."""
        first = self.num_steps - len(self._records)  # the oldest kept record's step
        return list(itertools.islice(self._records, max(0, step - first), None))


def step_record(
    num: int,
    start_time: float,
    ms: dict[str, float],
    total_ms: float,
    batch: ScheduledBatch,
    scheduler: Scheduler,
    block_manager: BlockManager,
    prefix_cache: tuple[int, int],
) -> StepRecord:
    """Step `num`'s record: its phase times `ms`, its batch, and the scheduler's and KV cache's
    state once it completed; `prefix_cache`: the (queries, hits) its scheduling made."""
    return StepRecord(
        step=num,
        start_time=start_time,
        schedule_ms=ms.get("schedule", 0.0),
        prepare_ms=ms.get("prepare", 0.0),
        forward_ms=ms.get("forward", 0.0),
        sample_ms=ms.get("sample", 0.0),
        structured_ms=ms.get("structured", 0.0),
        postprocess_ms=ms.get("postprocess", 0.0),
        total_ms=total_ms,
        num_prefill_tokens=batch.num_prefill_tokens,
        num_prefill_seqs=len(batch.work) - batch.num_decode,
        num_decode_seqs=batch.num_decode,
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        kv_blocks_used=block_manager.num_used,
        kv_blocks_free=block_manager.num_free,
        num_preemptions=batch.num_preempted,
        prefix_cache_queries=prefix_cache[0],
        prefix_cache_hits=prefix_cache[1],
    )
