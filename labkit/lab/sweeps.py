"""labkit.sweep(): run a grid of benchmark points and keep them as one DataFrame.

Every point goes through the benchmark functions (labkit.bench.latency / throughput), so a sweep
measures exactly what `labkit bench` does. The model is loaded once per tensor-parallel size (one
engine per (model, TP, engine args)); each point then runs `num_iters_warmup` untimed and
`num_iters` timed batches of `batch_size` random prompts of `input_len` tokens, each generating
exactly `output_len` tokens.

Per point, beside the benchmark's latencies, the timed batches' engine steps give
  ttft_s   from a batch's first step to the end of its last prefill step (every prompt has its
           first token then: the batch arrives at once)
  tpot_s   the rest of the batch's steps per further token
and from those the prefill and decode token rates, the peak KV-cache usage, and the roofline
figures of labkit.lab.roofline. The hf backend has no step log: its TTFT is the time of the same
batch generating one token (`output_len=1`), its TPOT the rest of the latency per further token,
and it has no KV-cache figures.

The prefix cache is off unless you pass enable_prefix_caching=True: the same prompts run in every
iteration, and a cache would serve their prefills after the first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from labkit.bench import common, latency, throughput
from labkit.config import add_engine_args
from labkit.lab import env, roofline

log = logging.getLogger("labkit.lab")

MODES = ("latency", "throughput")
POINT_KEYS = ["model", "tensor_parallel_size", "backend", "mode", "batch_size", "input_len", "output_len"]
METRIC_COLUMNS = ["avg_latency_s", "p50_latency_s", "p90_latency_s", "p99_latency_s", "ttft_s", "tpot_s",
                  "prefill_tok_s", "decode_tok_s", "output_tok_s", "peak_kv_usage",
                  "prefill_gflop", "prefill_gb", "decode_gflop", "decode_gb",
                  "prefill_gflops", "decode_gbps", "flops_fraction", "bw_fraction",
                  "floor_latency_s", "floor_fraction"]
FILE_FORMAT = "labkit-sweep/1"


@dataclass(frozen=True)
class SweepGrid:
    """A sweep's points and how each is measured: the defaults of sweep(), `labkit sweep` and
    the dashboard alike."""
    batch_sizes: tuple[int, ...] = (1, 4)
    input_lens: tuple[int, ...] = (32, 128)
    output_lens: tuple[int, ...] = (16,)
    tensor_parallel_sizes: tuple[int, ...] = (1,)
    mode: str = "latency"
    backend: str = "labkit"
    num_iters: int = 3
    num_iters_warmup: int = 1


DEFAULTS = SweepGrid()


@dataclass
class SweepResult:
    """One row per point (POINT_KEYS, then METRIC_COLUMNS) and where it was measured: `meta`
    holds the sweep's arguments, the environment and the machine's ceilings."""
    df: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.meta.get("label") or self.meta.get("params", {}).get("backend", "sweep")

    def plot(self, kind: str | None = None):
        """One plotly figure (`kind` one of labkit.lab.charts.KINDS), or all of them as a dict
        that displays every figure in a notebook."""
        from labkit.lab import charts
        return charts.sweep_charts(self.df, self.meta.get("ceilings"), kind)

    def save(self, path: str | Path) -> Path:
        """JSON holding the DataFrame (with its dtypes) and `meta`; read back with load_sweep."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FILE_FORMAT, "meta": self.meta, "table": _table(self.df)}, indent=1))
        return path

    def to_html(self, path: str | Path) -> Path:
        """A self-contained report (plotly.js inlined: viewable offline): charts, table, environment."""
        from labkit.lab import charts
        return charts.write_report(path, f"labkit sweep: {self.label}", self.plot(), self.df, self.meta)

    def compare(self, other: "SweepResult", labels: tuple[str, str] | None = None) -> "SweepComparison":
        """The points both sweeps ran, side by side (labkit vs hf, before vs after)."""
        if labels is None:
            labels = (self.label, other.label)
            if labels[0] == labels[1]:
                labels = ("before", "after")
        keys = ["tensor_parallel_size", "batch_size", "input_len", "output_len"]
        a, b = (r.df[keys + COMPARED].rename(columns={m: f"{m}_{lab}" for m in COMPARED})
                for r, lab in zip((self, other), labels))
        df = a.merge(b, on=keys)
        for m in COMPARED:
            df[f"{m}_ratio"] = df[f"{m}_{labels[1]}"] / df[f"{m}_{labels[0]}"]
        return SweepComparison(df, labels)

    def _repr_html_(self) -> str:
        e = self.meta.get("environment", {})
        return (f"<b>labkit sweep</b> ({self.label}): {len(self.df)} points on {e.get('device_name')}"
                f" (torch {e.get('torch')}, labkit {e.get('labkit')}, commit {e.get('git_commit')})"
                + self.df.to_html(index=False, float_format=lambda x: f"{x:.4g}"))


COMPARED = ["avg_latency_s", "ttft_s", "tpot_s", "prefill_tok_s", "decode_tok_s", "output_tok_s", "floor_fraction"]


@dataclass
class SweepComparison:
    """Per common point: each metric of COMPARED under both labels, and `<metric>_ratio` =
    second / first."""
    df: pd.DataFrame
    labels: tuple[str, str]

    def plot(self, metric: str = "output_tok_s"):
        from labkit.lab import charts
        return charts.comparison(self.df, self.labels, metric)

    def _repr_html_(self) -> str:
        return self.df.to_html(index=False, float_format=lambda x: f"{x:.4g}")


def load_sweep(path: str | Path) -> SweepResult:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FILE_FORMAT:
        raise ValueError(f"{path}: not a labkit sweep file (format {data.get('format')!r}, "
                         f"expected {FILE_FORMAT!r})")
    return SweepResult(_frame(data["table"]), data["meta"])


def _table(df: pd.DataFrame) -> dict:
    """Columns, dtypes and values; floats written by Python's json (shortest exact repr), NaN as
    null (strict JSON), so a reloaded DataFrame equals the saved one."""
    data = {c: [None if isinstance(v, float) and math.isnan(v) else v for v in df[c].tolist()] for c in df.columns}
    return {"columns": list(df.columns), "dtypes": {c: str(t) for c, t in df.dtypes.items()}, "data": data}


def _frame(table: dict) -> pd.DataFrame:
    return pd.DataFrame(table["data"], columns=table["columns"]).astype(table["dtypes"])


# ---- running a sweep --------------------------------------------------------------------------
def sweep(model: str | None = None, batch_sizes=DEFAULTS.batch_sizes, input_lens=DEFAULTS.input_lens,
          output_lens=DEFAULTS.output_lens, tensor_parallel_sizes=DEFAULTS.tensor_parallel_sizes,
          mode: str = DEFAULTS.mode, backend: str = DEFAULTS.backend, num_iters: int = DEFAULTS.num_iters,
          num_iters_warmup: int = DEFAULTS.num_iters_warmup, seed: int = 0, label: str | None = None, progress: bool = True,
          live: bool | None = None, on_point: Callable[[pd.DataFrame], None] | None = None,
          **engine_args) -> SweepResult:
    """Every combination of the lists, one row each. mode="latency" runs
    labkit.bench.latency, mode="throughput" labkit.bench.throughput (the only one with
    backend="hf", transformers' generate). `live`: a chart that fills in as points finish (default:
    in a notebook with ipywidgets); `on_point(df)` gets the rows so far after each point."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: must be one of {', '.join(MODES)}")
    if backend not in throughput.BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: must be one of {', '.join(throughput.BACKENDS)}")
    if backend == "hf" and mode != "throughput":
        raise ValueError("backend='hf' runs through the throughput benchmark: pass mode='throughput'")
    if num_iters < 1 or num_iters_warmup < 0:
        raise ValueError(f"num_iters={num_iters!r}, num_iters_warmup={num_iters_warmup!r}: "
                         "need num_iters >= 1 and num_iters_warmup >= 0")
    grid = [(tp, i, o, b) for tp in tensor_parallel_sizes for i in input_lens for o in output_lens
            for b in batch_sizes]
    if not grid:
        raise ValueError("empty sweep: every list (batch_sizes, input_lens, output_lens, "
                         "tensor_parallel_sizes) needs at least one value")
    engine_args.setdefault("enable_prefix_caching", False)
    meta = {"label": label, "params": dict(model=model, batch_sizes=list(batch_sizes),
                                           input_lens=list(input_lens), output_lens=list(output_lens),
                                           tensor_parallel_sizes=list(tensor_parallel_sizes), mode=mode,
                                           backend=backend, num_iters=num_iters,
                                           num_iters_warmup=num_iters_warmup, seed=seed),
            "engine_args": {k: v if _jsonable(v) else repr(v) for k, v in engine_args.items()}}
    chart = _live_chart(live)
    bar = tqdm(total=len(grid), desc=f"sweep ({mode}, {backend})", disable=not progress)
    rows: list[dict] = []
    for tp in dict.fromkeys(tensor_parallel_sizes):
        point = _Point(model, tp, backend, mode, num_iters, num_iters_warmup, seed, engine_args)
        if "environment" not in meta:
            meta["environment"] = env.environment(point.config.device)
            meta["ceilings"] = asdict(point.device_ceilings)
        with point.engine() as llm:
            for _, i, o, b in (g for g in grid if g[0] == tp):
                bar.set_postfix_str(f"tp={tp} in={i} out={o} batch={b}")
                rows.append(point.run(llm, b, i, o))
                bar.update(1)
                df = pd.DataFrame(rows)
                if chart is not None:
                    chart.update(df)
                if on_point is not None:
                    on_point(df)
    bar.close()
    df = pd.DataFrame(rows, columns=POINT_KEYS + METRIC_COLUMNS)
    if (df.flops_fraction > 1).any() or (df.bw_fraction > 1).any():
        log.warning("some points ran faster than this machine's cached ceilings (measured while it was "
                    "busy?): labkit.lab.roofline.ceilings(device, dtype, refresh=True) measures again")
    return SweepResult(df, meta)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _live_chart(live: bool | None):
    if live is False:
        return None
    from labkit.lab import charts
    if live is None and not (charts.in_notebook() and charts.has_widgets()):
        return None
    chart = charts.LiveChart()
    chart.show()
    return chart


class _Point:
    """What the points of one engine share: its resolved config, the model's shape, the machine's
    ceilings, and how to measure one (batch, input, output) point on it."""

    def __init__(self, model, tp: int, backend: str, mode: str, num_iters: int, warmup: int, seed: int,
                 engine_args: dict):
        from labkit import EngineConfig
        from labkit.engine.resolved_config import resolve
        self.engine_kwargs = dict(engine_args, model=model, tensor_parallel_size=tp)
        # Resolved as the benchmarks' engine will be (common.engine): the same config, dtype, device.
        self.config = resolve(EngineConfig.from_kwargs(**self.engine_kwargs, seed=seed))
        self.model_name = _model_name(model)
        self.tp, self.backend, self.mode = tp, backend, mode
        self.num_iters, self.warmup, self.seed = num_iters, warmup, seed
        self.shape = roofline.ModelShape.from_config(self.config)
        self.device_ceilings = roofline.ceilings(self.config.device, self.config.dtype)
        # Ranks on separate GPUs add up; ranks on one CPU share its cores and memory.
        cuda = self.config.device.startswith("cuda")
        self.ceilings = self.device_ceilings.scaled(tp) if cuda else self.device_ceilings

    def engine(self):
        """The loaded labkit engine for this TP size (hf: none, each run loads transformers)."""
        if self.backend == "hf":
            return contextlib.nullcontext()
        return common.engine(None, self.seed, self.engine_kwargs)

    def run(self, llm, batch: int, input_len: int, output_len: int) -> dict:
        if self.backend == "hf":
            latencies, ttft, tpot, peak_kv = self._run_hf(batch, input_len, output_len)
        else:
            latencies, ttft, tpot, peak_kv = self._run_labkit(llm, batch, input_len, output_len)
        row = dict(model=self.model_name, tensor_parallel_size=self.tp, backend=self.backend,
                   mode=self.mode, batch_size=batch, input_len=input_len, output_len=output_len)
        pct = common.percentiles(latencies, (50, 90, 99))
        lat = float(np.mean(latencies))
        decode_s = tpot * (output_len - 1) if output_len > 1 else math.nan
        prefill, decode = roofline.batch_work(self.shape, batch, input_len, output_len, self.ceilings)
        c = self.ceilings
        row.update(avg_latency_s=lat, p50_latency_s=pct["50"], p90_latency_s=pct["90"],
                   p99_latency_s=pct["99"], ttft_s=ttft, tpot_s=tpot,
                   prefill_tok_s=batch * input_len / ttft, decode_tok_s=batch / tpot,
                   output_tok_s=batch * output_len / lat, peak_kv_usage=peak_kv,
                   prefill_gflop=prefill.flops / 1e9, prefill_gb=prefill.bytes / 1e9,
                   decode_gflop=decode.flops / 1e9, decode_gb=decode.bytes / 1e9,
                   prefill_gflops=prefill.flops / ttft / 1e9, decode_gbps=decode.bytes / decode_s / 1e9)
        row.update(flops_fraction=row["prefill_gflops"] * 1e9 / c.flops_per_s,
                   bw_fraction=row["decode_gbps"] * 1e9 / c.bytes_per_s,
                   floor_latency_s=prefill.floor_s + decode.floor_s)
        row["floor_fraction"] = row["floor_latency_s"] / lat
        return row

    def _run_labkit(self, llm, batch: int, input_len: int, output_len: int):
        first = common.num_steps(llm)
        common_kw = dict(input_len=input_len, output_len=output_len, seed=self.seed, llm=llm, disable_tqdm=True)
        if self.mode == "latency":
            latencies = latency.run(batch_size=batch, num_iters_warmup=self.warmup, num_iters=self.num_iters,
                                    **common_kw)["latencies"]
        else:
            runs = [throughput.run(num_prompts=batch, **common_kw) for _ in range(self.warmup + self.num_iters)]
            latencies = [r["elapsed_time"] for r in runs[self.warmup:]]
        bursts = split_batches(llm.step_log().iloc[first:])
        if len(bursts) != self.warmup + self.num_iters:
            raise RuntimeError(f"expected {self.warmup + self.num_iters} batches in the step log, found "
                               f"{len(bursts)}: was the engine busy with other requests?")
        timed = [batch_times(s) for s in bursts[self.warmup:]]
        ttft = float(np.mean([t[0] for t in timed]))
        tpot = float(np.mean([(t[1] - t[0]) / (output_len - 1) for t in timed])) if output_len > 1 else math.nan
        return latencies, ttft, tpot, max(t[2] for t in timed)

    def _run_hf(self, batch: int, input_len: int, output_len: int):
        from transformers.utils import logging as hf_logging
        kw = dict(self.engine_kwargs, backend="hf", num_prompts=batch, input_len=input_len,
                  hf_max_batch_size=batch, seed=self.seed, disable_tqdm=True)
        # Each run loads the model: its progress bars would fill a notebook.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            runs = [throughput.run(output_len=output_len, **kw)["elapsed_time"]
                    for _ in range(self.warmup + self.num_iters)]
            ttft = throughput.run(output_len=1, **kw)["elapsed_time"]
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        latencies = runs[self.warmup:]
        tpot = (float(np.mean(latencies)) - ttft) / (output_len - 1) if output_len > 1 else math.nan
        return latencies, ttft, tpot, math.nan


def _model_name(model: str | None) -> str:
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


def batch_times(steps: pd.DataFrame) -> tuple[float, float, float]:
    """(seconds to the end of the last prefill step, seconds to the end of the last step, peak
    fraction of KV blocks in use) of one batch's steps."""
    start = steps.start_time.iloc[0]
    ends = steps.start_time + steps.total_ms / 1e3
    prefill = steps.num_prefill_tokens.to_numpy() > 0
    ttft = ends[prefill].iloc[-1] - start if prefill.any() else math.nan
    kv = (steps.kv_blocks_used / (steps.kv_blocks_used + steps.kv_blocks_free)).max()
    return float(ttft), float(ends.iloc[-1] - start), float(kv)


# ---- `labkit sweep` -----------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    # As sweep(): the prefix cache off unless asked for (--enable-prefix-caching).
    p.set_defaults(enable_prefix_caching=False)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULTS.batch_sizes), dest="batch_sizes")
    p.add_argument("--input-lens", type=int, nargs="+", default=list(DEFAULTS.input_lens), dest="input_lens")
    p.add_argument("--output-lens", type=int, nargs="+", default=list(DEFAULTS.output_lens), dest="output_lens")
    p.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=None, dest="tensor_parallel_sizes",
                   help="TP sizes to sweep (default: --tensor-parallel-size)")
    p.add_argument("--mode", choices=MODES, default=DEFAULTS.mode)
    p.add_argument("--backend", choices=throughput.BACKENDS, default=DEFAULTS.backend)
    p.add_argument("--num-iters", type=int, default=DEFAULTS.num_iters, dest="num_iters")
    p.add_argument("--num-iters-warmup", type=int, default=DEFAULTS.num_iters_warmup, dest="num_iters_warmup")
    p.add_argument("--label", default=None)
    p.add_argument("--output-dir", default="labkit_sweep", dest="output_dir",
                   help="where sweep.json, sweep.csv and sweep.html (the report) go")


def main(args: argparse.Namespace, engine_kwargs: dict) -> int:
    """`labkit sweep`: `engine_kwargs` are the CLI's engine flags."""
    kwargs = dict(engine_kwargs)
    tp = kwargs.pop("tensor_parallel_size", 1)
    result = sweep(batch_sizes=args.batch_sizes, input_lens=args.input_lens, output_lens=args.output_lens,
                   tensor_parallel_sizes=args.tensor_parallel_sizes or [tp], mode=args.mode,
                   backend=args.backend, num_iters=args.num_iters, num_iters_warmup=args.num_iters_warmup,
                   label=args.label, live=False, **kwargs)
    out = Path(args.output_dir)
    paths = [result.save(out / "sweep.json"), out / "sweep.csv", result.to_html(out / "sweep.html")]
    result.df.to_csv(paths[1], index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 12):
        print(result.df[POINT_KEYS[3:] + ["avg_latency_s", "ttft_s", "tpot_s", "output_tok_s", "floor_fraction"]])
    print("wrote " + ", ".join(map(str, paths)))
    return 0
