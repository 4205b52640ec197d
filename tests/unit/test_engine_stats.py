"""The engine's read-only stats surface: the bounded step history and the snapshot's derived
numbers."""

from __future__ import annotations

import dataclasses

import pytest

from labkit.engine.stats import EngineStats, StepHistory
from labkit.observe.step_log import StepRecord


def _record(step: int) -> StepRecord:
    zeros = {f.name: 0 for f in dataclasses.fields(StepRecord)}
    return StepRecord(**{**zeros, "step": step})


def test_step_history_keeps_the_latest_records_and_counts_every_step():
    history = StepHistory(maxlen=3)
    assert history.last is None and history.since(0) == []
    for i in range(5):
        history.add(_record(i))
    assert history.num_steps == 5 and history.last.step == 4
    assert [r.step for r in history.since(0)] == [2, 3, 4]  # the older ones were dropped
    assert [r.step for r in history.since(3)] == [3, 4]
    assert history.since(5) == []


def test_engine_stats_is_a_frozen_snapshot():
    stats = EngineStats(
        num_steps=7,
        num_running=2,
        num_waiting=1,
        num_unfinished_requests=3,
        kv_blocks_used=16,
        kv_blocks_total=64,
        last_step=None,
    )
    assert stats.kv_blocks_free == 48 and stats.kv_cache_usage == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.num_steps = 8
