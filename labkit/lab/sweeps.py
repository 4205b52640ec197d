"""labkit.sweep(): run a grid of benchmark points and keep them as one DataFrame.

Every point goes through the benchmark functions (labkit.bench.latency / throughput; measuring
one is labkit.lab.points.run_point). The model is loaded once per tensor-parallel size (one
engine per (model, TP, engine args)).

A sweep survives its interruption: every argument is checked before any model loads (the
engine arguments by resolving each TP size's config); with `output=` every finished point is
appended to the sweep's file as it finishes (labkit.lab.sweep_file); an interrupt (Ctrl-C, the
notebook's stop button, `stop()` returning True) ends the engine in use (closed, KV cache freed)
and returns the rows so far, marked `meta["interrupted"]`; `labkit.last_sweep()` holds the
running or last sweep's result whatever happened. `resume=` an earlier sweep's file runs only
the points it lacks. `cluster=` runs the engines on a Ray cluster instead, side by side
(labkit.lab.cluster), keeping the same rows, file, interrupts and resume.

The prefix cache is off unless you pass enable_prefix_caching=True: the same prompts run in every
iteration, and a cache would serve their prefills after the first.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from labkit.bench import throughput
from labkit.lab import env, machine, sweep_file
from labkit.lab.columns import COLUMNS, METRIC_COLUMNS, POINT_KEYS, SPREAD_COLUMNS
from labkit.lab.compare import SweepComparison, compare_sweeps
from labkit.lab.points import (
    EngineGroup,
    Point,
    PointRecord,
    batch_times,
    failed,
    split_batches,
)
from labkit.lab.sweep_run import SweepRun
from labkit.observe.trace import DEFAULT_PROFILE_DIR

__all__ = [
    "COLUMNS",
    "METRIC_COLUMNS",
    "POINT_KEYS",
    "SPREAD_COLUMNS",
    "DEFAULTS",
    "MODES",
    "SweepGrid",
    "SweepResult",
    "SweepComparison",
    "sweep",
    "load_sweep",
    "last_sweep",
    "batch_times",
    "split_batches",
]

log = logging.getLogger("labkit.lab")

MODES = ("latency", "throughput")
FILE_FORMAT = sweep_file.FORMAT


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
    """One row per point (columns.COLUMNS) and where it was measured: `meta` holds the sweep's
    arguments, the environment and the machine's ceilings; `records` (one per row, in order)
    the raw timings, step logs and profiles behind the rows: `.point(i)` opens one."""

    df: pd.DataFrame
    meta: dict = field(default_factory=dict)
    records: list[PointRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.meta.get("label") or self.meta.get("params", {}).get("backend", "sweep")

    @property
    def interrupted(self) -> bool:
        return bool(self.meta.get("interrupted"))

    def plot(self, kind: str | None = None):
        """One plotly figure (`kind` one of labkit.lab.charts.KINDS), or all of them as a dict
        that displays every figure in a notebook."""
        from labkit.lab import charts

        tp = self.meta.get("params", {}).get("tensor_parallel_sizes", ())
        return charts.sweep_charts(self.df, self.meta.get("ceilings"), kind, tp)

    def point(self, index: int):
        """Row `index`'s drill-down: its step timeline, operator breakdown and trace."""
        from labkit.lab.drilldown import PointDetail

        return PointDetail(self.df.iloc[index], self.records[index])

    def slowest(self, metric: str = "floor_fraction"):
        """The drill-down of the point furthest from its floor (lowest `metric`)."""
        return self.point(int(self.df[metric].reset_index(drop=True).idxmin()))

    def save(self, path: str | Path) -> Path:
        """The sweep's file (labkit.lab.sweep_file); read back with load_sweep."""
        return sweep_file.write(Path(path), self.meta, self.records)

    def to_html(self, path: str | Path) -> Path:
        """A self-contained report (plotly.js inlined: viewable offline): charts, table,
        environment."""
        from labkit.lab import report

        return report.write_report(
            path, f"labkit sweep: {self.label}", self.plot(), self.df, self.meta
        )

    def compare(
        self,
        other: SweepResult,
        labels: tuple[str, str] | None = None,
        *,
        allow_mode_mismatch: bool = False,
    ) -> SweepComparison:
        """The points both sweeps ran, side by side (labkit vs hf, before vs after). Sweeps of
        different modes time different things (a latency batch vs a throughput run): refused
        unless allow_mode_mismatch=True, and then said in a warning."""
        return compare_sweeps(self, other, labels, allow_mode_mismatch)

    def _repr_html_(self) -> str:
        e = self.meta.get("environment", {})
        state = " <b style='color:#c00'>interrupted</b>" if self.interrupted else ""
        return (
            f"<b>labkit sweep</b> ({self.label}): {len(self.df)} points{state} on "
            f"{e.get('device_name')} (torch {e.get('torch')}, labkit {e.get('labkit')}, "
            f"commit {e.get('git_commit')})"
            + _compact(self.df).to_html(index=False, float_format=lambda x: f"{x:.4g}")
        )


def _compact(df: pd.DataFrame) -> pd.DataFrame:
    """The table as a notebook shows it: a long warning text would make each row a page tall,
    so it shows as its first words (the DataFrame keeps it whole)."""
    if "warnings" not in df:
        return df
    short = df.warnings.map(
        lambda w: w if not isinstance(w, str) or len(w) <= 40 else w[:37] + "..."
    )
    return df.assign(warnings=short)


def load_sweep(path: str | Path) -> SweepResult:
    meta, records = sweep_file.read(path)
    return SweepResult(sweep_file.rows_frame(records), meta, records)


# The running or last sweep of this process, for labkit.last_sweep(): a sweep interrupted in a
# notebook cell has no value to assign, and this is where its rows stay reachable.
_last: list[SweepResult] = []


def last_sweep() -> SweepResult | None:
    """The running or most recent sweep's result in this process (interrupted ones included)."""
    return _last[-1] if _last else None


# ---- checking the arguments -------------------------------------------------------------
def _positive_ints(name: str, values) -> list[int]:
    values = list(values) if not isinstance(values, (str, bytes)) else [values]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1]
    if bad:
        raise ValueError(f"{name}={values!r} is invalid: {bad[0]!r} is not a positive integer")
    return list(dict.fromkeys(int(v) for v in values))


def _check(grid: SweepGrid, on_interrupt: str) -> list[Point]:
    if grid.mode not in MODES:
        raise ValueError(f"mode={grid.mode!r} is invalid: must be one of {', '.join(MODES)}")
    if grid.backend not in throughput.BACKENDS:
        raise ValueError(
            f"backend={grid.backend!r} is invalid: must be one of {', '.join(throughput.BACKENDS)}"
        )
    if grid.backend == "hf" and grid.mode != "throughput":
        raise ValueError(
            "backend='hf' runs through the throughput benchmark: pass mode='throughput'"
        )
    if (
        not isinstance(grid.num_iters, int)
        or grid.num_iters < 1
        or not isinstance(grid.num_iters_warmup, int)
        or grid.num_iters_warmup < 0
    ):
        raise ValueError(
            f"num_iters={grid.num_iters!r}, num_iters_warmup="
            f"{grid.num_iters_warmup!r}: need num_iters >= 1 and "
            "num_iters_warmup >= 0"
        )
    if on_interrupt not in ("return", "raise"):
        raise ValueError(f"on_interrupt={on_interrupt!r} is invalid: 'return' or 'raise'")
    lists = {
        k: getattr(grid, k)
        for k in ("tensor_parallel_sizes", "input_lens", "output_lens", "batch_sizes")
    }
    if any(len(list(v)) == 0 for v in lists.values()):
        raise ValueError(
            "empty sweep: every list (batch_sizes, input_lens, output_lens, "
            "tensor_parallel_sizes) needs at least one value"
        )
    tps, ins, outs, bs = (_positive_ints(k, v) for k, v in lists.items())
    return [Point(tp, b, i, o) for tp in tps for i in ins for o in outs for b in bs]


def _resumed(path: str | Path, meta: dict) -> tuple[list[PointRecord], bool]:
    """The records of an earlier sweep's file, refused when it measured something else, less
    its failed points (run again); and whether there were such."""
    old_meta, records = sweep_file.read(path)
    old, new = old_meta.get("params", {}), meta["params"]
    for key in ("model", "mode", "backend", "num_iters", "num_iters_warmup", "seed"):
        if old.get(key) != new.get(key):
            raise ValueError(
                f"resume={str(path)!r}: that sweep ran {key}={old.get(key)!r}, this "
                f"one asks for {new.get(key)!r}"
            )
    if old_meta.get("engine_args") != meta["engine_args"]:
        raise ValueError(
            f"resume={str(path)!r}: that sweep's engine arguments "
            f"{old_meta.get('engine_args')} differ from {meta['engine_args']}"
        )
    kept = [r for r in records if not failed(r.row)]
    return kept, len(kept) < len(records)


# ---- running a sweep --------------------------------------------------------------------------
def sweep(
    model: str | None = None,
    batch_sizes=DEFAULTS.batch_sizes,
    input_lens=DEFAULTS.input_lens,
    output_lens=DEFAULTS.output_lens,
    tensor_parallel_sizes=DEFAULTS.tensor_parallel_sizes,
    mode: str = DEFAULTS.mode,
    backend: str = DEFAULTS.backend,
    num_iters: int = DEFAULTS.num_iters,
    num_iters_warmup: int = DEFAULTS.num_iters_warmup,
    seed: int = 0,
    label: str | None = None,
    progress: bool = True,
    live: bool | None = None,
    on_point: Callable[[pd.DataFrame], None] | None = None,
    on_start: Callable[[Point], None] | None = None,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    stop: Callable[[], bool] | None = None,
    on_interrupt: str = "return",
    profile: bool = False,
    profile_dir: str | Path | None = None,
    cluster: str | None = None,
    **engine_args,
) -> SweepResult:
    """Every combination of the lists, one row each. mode="latency" runs
    labkit.bench.latency, mode="throughput" labkit.bench.throughput (the only one with
    backend="hf", transformers' generate).

    `live`: a chart that fills in as points finish (default: in a notebook with ipywidgets),
    left as a static figure at the end; `on_start(point)` / `on_point(df)` are called as each
    point starts / after it (with the rows so far). `output`: the sweep's file, a line appended
    per finished point. `resume`: an earlier sweep's file; its points are not run again (and
    `output` defaults to it, so it grows). `stop()`: checked before each point; True ends the
    sweep like an interrupt. `on_interrupt`: "return" the rows so far (default) or "raise" the
    KeyboardInterrupt after keeping them. `profile`: one more batch per point under
    torch.profiler (traces in `profile_dir`) for `.point(i).operators()` / `.trace()`.
    `cluster`: None runs here; "local" (a Ray instance on this machine's GPUs, or CPUs) or a Ray
    address ("auto", "ray://host:10001") runs each engine on the cluster, side by side
    (labkit.lab.cluster)."""
    grid = SweepGrid(
        tuple(batch_sizes),
        tuple(input_lens),
        tuple(output_lens),
        tuple(tensor_parallel_sizes),
        mode,
        backend,
        num_iters,
        num_iters_warmup,
    )
    points = _check(grid, on_interrupt)
    tp_sizes = list(dict.fromkeys(p.tensor_parallel_size for p in points))
    engine_args.setdefault("enable_prefix_caching", False)
    meta = {
        "label": label,
        "params": dict(
            model=model,
            batch_sizes=_positive_ints("batch_sizes", batch_sizes),
            input_lens=_positive_ints("input_lens", input_lens),
            output_lens=_positive_ints("output_lens", output_lens),
            tensor_parallel_sizes=tp_sizes,
            mode=mode,
            backend=backend,
            num_iters=num_iters,
            num_iters_warmup=num_iters_warmup,
            seed=seed,
        ),
        "engine_args": {
            k: v if sweep_file.jsonable(v) else repr(v) for k, v in engine_args.items()
        },
    }
    records, dropped = _resumed(resume, meta) if resume is not None else ([], False)
    if resume is not None and output is None:
        output = resume
    # Every engine's config resolved (and the ceilings measured) before any model loads.
    groups = {
        tp: EngineGroup(model, tp, backend, mode, num_iters, num_iters_warmup, seed, engine_args)
        for tp in tp_sizes
    }
    first = groups[tp_sizes[0]]
    meta["environment"] = env.environment(first.device)
    meta["ceilings"] = asdict(first.device_ceilings)
    done = {Point.of_row(r.row) for r in records}
    todo = [p for p in points if p not in done]
    if records:
        log.info(
            "resuming: %d of %d points already in %s", len(points) - len(todo), len(points), resume
        )
    writer = None
    if output is not None:
        same = resume is not None and Path(output).resolve() == Path(resume).resolve()
        # Failed points leave the file (rewritten) when they are run again.
        writer = sweep_file.Writer(Path(output), meta, records, append=same and not dropped)
    result = SweepResult(sweep_file.rows_frame(records), meta, records)
    _last[:] = [result]
    run = SweepRun(
        result,
        groups,
        writer,
        live=live,
        progress=progress,
        total=len(todo),
        desc=f"sweep ({mode}, {backend})",
        on_point=on_point,
        on_start=on_start,
        stop=stop,
        profile_dir=(profile_dir or DEFAULT_PROFILE_DIR) if profile else None,
    )
    try:
        if cluster is None:
            run.local(todo)
        else:
            from labkit.lab import cluster as ray_cluster

            ray_cluster.run(run, todo, cluster)
    except KeyboardInterrupt:
        run.end("interrupted", interrupted=True)
        log.warning(
            "sweep interrupted after %d of %d points: the rows so far are in the "
            "result%s (and labkit.last_sweep())",
            run.finished,
            len(todo),
            f" and {output}" if output else "",
        )
        if on_interrupt == "raise":
            raise
        return result
    except BaseException as e:
        run.end(f"failed: {type(e).__name__}: {e}", interrupted=True)
        raise
    run.end("stopped" if run.stopped else "done", interrupted=run.stopped)
    machine.warn_untrustworthy(result.df)
    return result
