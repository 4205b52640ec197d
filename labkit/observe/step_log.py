"""One record per engine step, the raw material of the profiling dashboard and benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class StepRecord:
    step: int
    start_time: float  # time.time() at the step's start
    schedule_ms: float
    prepare_ms: float
    forward_ms: float
    sample_ms: float
    structured_ms: float  # structured outputs: matchers, waiting for and applying token masks
    postprocess_ms: float
    total_ms: float
    num_prefill_tokens: int
    num_prefill_seqs: int
    num_decode_seqs: int
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int  # of which were found


def to_dataframe(records):
    import pandas as pd

    cols = list(StepRecord.__dataclass_fields__)
    return pd.DataFrame([asdict(r) for r in records], columns=cols)
