"""The engine's read-only surface for its neighbours (the server's metrics, the benchmarks, the
lab, tests): `LLMEngine.stats()` returns an `EngineStats` snapshot, `LLMEngine.step_records()`
the recent steps' records, which a `StepHistory` keeps."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

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
