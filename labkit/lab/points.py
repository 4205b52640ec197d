"""One sweep point: what it is (Point), what its engine shares with the others (EngineGroup), and
measuring it: run_point(group, llm, point) -> PointRecord, the row plus what it came from.

A point runs `num_iters_warmup` untimed and `num_iters` timed batches of `batch_size` random
prompts of `input_len` tokens, each generating exactly `output_len` tokens, through the benchmark
functions (labkit.bench.latency / throughput), so it measures exactly what `labkit bench` does.

From the timed batches' engine steps:
  ttft_s   from a batch's first step until its last prefill step's tokens are in (every prompt
           has its first token then: the batch arrives at once; see batch_times)
  tpot_s   the rest of the batch's steps per further token
and from those the prefill and decode token rates, the peak KV-cache usage, and the roofline
figures of labkit.lab.roofline. The hf backend has no step log: its TTFT is the time of the same
batch generating one token (`output_len=1`), its TPOT the rest of the latency per further token,
and it has no KV-cache figures.

Every figure comes with its spread and the machine's state (labkit.lab.machine); the raw
timings are kept (`PointRecord.raw`), so the row can be derived again under other ceilings.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from labkit.bench import common, latency, throughput
from labkit.lab import machine, roofline
from labkit.lab.columns import COLUMNS


@dataclass(frozen=True)
class Point:
    tensor_parallel_size: int
    batch_size: int
    input_len: int
    output_len: int

    @classmethod
    def of_row(cls, row) -> Point:
        return cls(
            int(row["tensor_parallel_size"]),
            int(row["batch_size"]),
            int(row["input_len"]),
            int(row["output_len"]),
        )

    def __str__(self) -> str:
        return (
            f"tp={self.tensor_parallel_size} in={self.input_len} out={self.output_len} "
            f"batch={self.batch_size}"
        )


@dataclass
class PointRecord:
    """A measured point: its row (COLUMNS), the raw timings it was derived from, the step log
    of its batches (warm-up included; `iteration` numbers them, negative for warm-up) and, when
    profiled, its operator categories, operators and trace file."""

    row: dict
    raw: dict
    steps: pd.DataFrame | None = None
    profile: dict | None = None


@dataclass
class EngineGroup:
    """What the points of one engine share: its resolved config, the model's shape, the machine's
    ceilings, and how each point is measured."""

    model: str | None
    tp: int
    backend: str
    mode: str
    num_iters: int
    warmup: int
    seed: int
    engine_args: dict
    config: object = field(init=False)
    ceilings: roofline.Ceilings = field(init=False)

    def __post_init__(self):
        from labkit import EngineConfig
        from labkit.engine.resolved_config import resolve

        self.engine_kwargs = dict(self.engine_args, model=self.model, tensor_parallel_size=self.tp)
        # Resolved as the benchmarks' engine will be (common.engine): the same config and
        # device. This reads the model's config only: bad engine arguments fail here, before
        # any weights load.
        self.config = resolve(EngineConfig.from_kwargs(**self.engine_kwargs, seed=self.seed))
        self.model_name = model_name(self.model)
        self.shape = roofline.ModelShape.from_config(self.config)
        self.set_ceilings(roofline.ceilings(self.config.device, self.config.dtype))

    @property
    def device(self) -> str:
        return self.config.device

    def set_ceilings(self, device_ceilings: roofline.Ceilings) -> None:
        self.device_ceilings = device_ceilings
        # Ranks on separate GPUs add up; ranks on one CPU share its cores and memory.
        cuda = self.config.device.startswith("cuda")
        self.ceilings = device_ceilings.scaled(self.tp) if cuda else device_ceilings

    def remeasure_ceilings(self) -> None:
        """Measure the ceilings again (keeping the better of old and new figures)."""
        self.set_ceilings(roofline.ceilings(self.config.device, self.config.dtype, refresh=True))

    def engine(self):
        """The loaded labkit engine for this TP size, closed when the block ends however it ends
        (hf: none, each run loads transformers)."""
        if self.backend == "hf":
            return contextlib.nullcontext()
        return common.engine(None, self.seed, self.engine_kwargs)


def run_point(
    group: EngineGroup, llm, point: Point, *, profile_dir: str | Path | None = None
) -> PointRecord:
    """Measure one point on `llm` (None for the hf backend). With `profile_dir`, one more
    untimed batch runs under torch.profiler, its trace written there."""
    before = machine.sample()
    if group.backend == "hf":
        raw, steps = _run_hf(group, point), None
    else:
        raw, steps = _run_labkit(group, llm, point)
    raw["machine"] = machine.state(before, group.device)
    record = PointRecord(derive(group, point, raw), raw, steps)
    if profile_dir is not None and llm is not None:
        record.profile = _profile(group, llm, point, profile_dir)
    return record


def derive(group: EngineGroup, point: Point, raw: dict) -> dict:
    """The row of a point from its raw timings, under the group's current ceilings."""
    b, i, o = point.batch_size, point.input_len, point.output_len
    lat, ttft, tpot = (machine.Spread.of(raw[k]) for k in ("latencies", "ttfts", "tpots"))
    row = dict(
        model=group.model_name,
        tensor_parallel_size=group.tp,
        backend=group.backend,
        mode=group.mode,
        batch_size=b,
        input_len=i,
        output_len=o,
    )
    decode_s = tpot.mean * (o - 1) if o > 1 else math.nan
    prefill, decode = roofline.batch_work(group.shape, b, i, o, group.ceilings)
    c = group.ceilings
    row.update(
        avg_latency_s=lat.mean,
        p50_latency_s=machine.percentile(raw["latencies"], 50),
        p90_latency_s=machine.percentile(raw["latencies"], 90),
        p99_latency_s=machine.percentile(raw["latencies"], 99),
        ttft_s=ttft.mean,
        tpot_s=tpot.mean,
        prefill_tok_s=b * i / ttft.mean,
        decode_tok_s=b / tpot.mean,
        output_tok_s=b * o / lat.mean,
        peak_kv_usage=raw["peak_kv"],
        prefill_gflop=prefill.flops / 1e9,
        prefill_gb=prefill.bytes / 1e9,
        decode_gflop=decode.flops / 1e9,
        decode_gb=decode.bytes / 1e9,
        prefill_gflops=prefill.flops / ttft.mean / 1e9,
        decode_gbps=decode.bytes / decode_s / 1e9,
    )
    row.update(
        flops_fraction=row["prefill_gflops"] * 1e9 / c.flops_per_s,
        bw_fraction=row["decode_gbps"] * 1e9 / c.bytes_per_s,
        floor_latency_s=prefill.floor_s + decode.floor_s,
    )
    row["floor_fraction"] = row["floor_latency_s"] / lat.mean
    row.update(
        num_iters=lat.n,
        latency_std_s=lat.std,
        latency_ci_low_s=lat.ci_low,
        latency_ci_high_s=lat.ci_high,
        ttft_std_s=ttft.std,
        tpot_std_s=tpot.std,
        output_tok_s_ci_low=b * o / lat.ci_high,
        output_tok_s_ci_high=b * o / lat.ci_low,
    )
    row.update(raw["machine"])
    row["warnings"] = "; ".join(machine.warnings(lat, raw["machine"]))
    row["error"] = ""
    return row


def failed_record(group: EngineGroup, point: Point, error: str, where: dict) -> PointRecord:
    """The row of a point that could not be measured: its keys, where it last ran, why."""
    row = dict.fromkeys(COLUMNS, math.nan)
    row.update(
        model=group.model_name,
        tensor_parallel_size=group.tp,
        backend=group.backend,
        mode=group.mode,
        batch_size=point.batch_size,
        input_len=point.input_len,
        output_len=point.output_len,
        num_iters=0,
        warnings="",
        error=error,
    )
    row.update(where)
    return PointRecord(row, {})


def failed(row: dict) -> bool:
    """Whether a row is a point that failed (rows of older files have no error column)."""
    return isinstance(row.get("error"), str) and bool(row["error"])


def _run_labkit(group: EngineGroup, llm, point: Point) -> tuple[dict, pd.DataFrame]:
    b, i, o = point.batch_size, point.input_len, point.output_len
    first = common.num_steps(llm)
    kw = dict(input_len=i, output_len=o, seed=group.seed, llm=llm, disable_tqdm=True)
    if group.mode == "latency":
        latencies = latency.run(
            batch_size=b, num_iters_warmup=group.warmup, num_iters=group.num_iters, **kw
        )["latencies"]
    else:
        runs = [throughput.run(num_prompts=b, **kw) for _ in range(group.warmup + group.num_iters)]
        latencies = [r["elapsed_time"] for r in runs[group.warmup :]]
    steps = llm.step_log().iloc[first:]
    bursts = split_batches(steps)
    if len(bursts) != group.warmup + group.num_iters:
        raise RuntimeError(
            f"expected {group.warmup + group.num_iters} batches in the step log, "
            f"found {len(bursts)}: was the engine busy with other requests?"
        )
    steps = pd.concat([s.assign(iteration=k - group.warmup) for k, s in enumerate(bursts)])
    timed = [batch_times(s, group.config.async_scheduling) for s in bursts[group.warmup :]]
    ttfts = [t[0] for t in timed]
    tpots = [(t[1] - t[0]) / (o - 1) if o > 1 else math.nan for t in timed]
    raw = {
        "latencies": list(latencies),
        "ttfts": ttfts,
        "tpots": tpots,
        "peak_kv": max(t[2] for t in timed),
    }
    return raw, steps.reset_index(drop=True)


def _run_hf(group: EngineGroup, point: Point) -> dict:
    from transformers.utils import logging as hf_logging

    b, i, o = point.batch_size, point.input_len, point.output_len
    kw = dict(
        group.engine_kwargs,
        backend="hf",
        num_prompts=b,
        input_len=i,
        hf_max_batch_size=b,
        seed=group.seed,
        disable_tqdm=True,
    )
    # Each run loads the model: its progress bars would fill a notebook.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        runs = [
            throughput.run(output_len=o, **kw)["elapsed_time"]
            for _ in range(group.warmup + group.num_iters)
        ]
        ttft = throughput.run(output_len=1, **kw)["elapsed_time"]
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    latencies = runs[group.warmup :]
    tpots = [(lat - ttft) / (o - 1) if o > 1 else math.nan for lat in latencies]
    return {"latencies": latencies, "ttfts": [ttft], "tpots": tpots, "peak_kv": math.nan}


def _profile(group: EngineGroup, llm, point: Point, trace_dir) -> dict:
    """One more batch of the point under torch.profiler: its categories, operators and trace."""
    from labkit.lab.profiling import profiling

    with profiling(llm, trace_dir) as cap:
        latency.run(
            batch_size=point.batch_size,
            num_iters_warmup=0,
            num_iters=1,
            input_len=point.input_len,
            output_len=point.output_len,
            seed=group.seed,
            llm=llm,
            disable_tqdm=True,
        )
    p = cap.result
    return {
        "categories": p.categories,
        "operators": p.operators,
        "wall_ms": p.wall_ms,
        "trace_path": str(p.trace_path),
        "steps": p.steps,
    }


def model_name(model: str | None) -> str:
    if model is None:
        from labkit.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(model).name


def split_batches(steps: pd.DataFrame) -> list[pd.DataFrame]:
    """The step log cut where the engine went idle: a batch ends at the step after which nothing
    is running or waiting (each benchmark iteration hands the engine one batch and drains it)."""
    idle = ((steps.num_running == 0) & (steps.num_waiting == 0)).to_numpy()
    ends = np.flatnonzero(idle) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return [steps.iloc[s:e] for s, e in zip(starts, ends)]


def batch_times(steps: pd.DataFrame, async_scheduling: bool) -> tuple[float, float, float]:
    """(seconds until every prompt has its first token, seconds to the end of the last step, peak
    fraction of KV blocks in use) of one batch's steps.

    A step's record ends when its call returns. Without async scheduling that is after its
    tokens are sampled; with it, the call returns once the step is launched and the previous
    step's tokens are in, so a prefill's first tokens arrive at the end of the next record (the
    prefill's device time shows there, not in its own record)."""
    start = steps.start_time.iloc[0]
    ends = steps.start_time + steps.total_ms / 1e3
    prefill = np.flatnonzero(steps.num_prefill_tokens.to_numpy() > 0)
    if len(prefill):
        last = min(prefill[-1] + int(async_scheduling), len(steps) - 1)
        ttft = ends.iloc[last] - start
    else:
        ttft = math.nan
    kv = (steps.kv_blocks_used / (steps.kv_blocks_used + steps.kv_blocks_free)).max()
    return float(ttft), float(ends.iloc[-1] - start), float(kv)
