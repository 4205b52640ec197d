"""A sweep's row: its columns in order (the point, its metrics, their spread, the machine's
state, where it ran, warnings and error) and their dtypes; frame() builds the DataFrame the same
from a run and from a file."""

from __future__ import annotations

import pandas as pd

from labkit.lab import machine

POINT_KEYS = [
    "model",
    "tensor_parallel_size",
    "backend",
    "mode",
    "batch_size",
    "input_len",
    "output_len",
]


METRIC_COLUMNS = [
    "avg_latency_s",
    "p50_latency_s",
    "p90_latency_s",
    "p99_latency_s",
    "ttft_s",
    "tpot_s",
    "prefill_tok_s",
    "decode_tok_s",
    "output_tok_s",
    "peak_kv_usage",
    "prefill_gflop",
    "prefill_gb",
    "decode_gflop",
    "decode_gb",
    "prefill_gflops",
    "decode_gbps",
    "flops_fraction",
    "bw_fraction",
    "floor_latency_s",
    "floor_fraction",
]


SPREAD_COLUMNS = [
    "num_iters",
    "latency_std_s",
    "latency_ci_low_s",
    "latency_ci_high_s",
    "ttft_std_s",
    "tpot_std_s",
    "output_tok_s_ci_low",
    "output_tok_s_ci_high",
]


# `error`: empty, or why the point has no figures (a sweep on a Ray cluster keeps a point that
# failed twice as a row, labkit.lab.cluster).
COLUMNS = (
    POINT_KEYS
    + METRIC_COLUMNS
    + SPREAD_COLUMNS
    + machine.MACHINE_COLUMNS
    + machine.WHERE_COLUMNS
    + ["warnings", "error"]
)


DTYPES = {
    **{c: "float64" for c in COLUMNS},
    "model": "object",
    "backend": "object",
    "mode": "object",
    "warnings": "object",
    "node": "object",
    "device": "object",
    "error": "object",
    "tensor_parallel_size": "int64",
    "batch_size": "int64",
    "input_len": "int64",
    "output_len": "int64",
    "num_iters": "int64",
}


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with COLUMNS and their dtypes (the same from a run and from a file)."""
    return pd.DataFrame(rows, columns=COLUMNS).astype(DTYPES)
