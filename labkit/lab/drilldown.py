"""Opening one sweep point: `result.point(i)` (or `result.slowest()`) -> PointDetail.

Every point keeps the engine steps of its batches (warm-up included), so its step timeline is
always there; a sweep run with profile=True also ran one more batch of each point under
torch.profiler, and keeps that batch's operator breakdown (time per category, per operator) and
its Chrome trace, drawn here on a time axis (plotly: no online viewer needed; the same file opens
in ui.perfetto.dev).
"""

from __future__ import annotations

import gzip
import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from labkit.lab import charts, profile_charts
from labkit.lab.points import PointRecord

# The ranges a trace is drawn by: the engine's step phases and the labelled layer categories.
PHASES = ("schedule", "prepare", "forward", "sample", "postprocess")


class PointDetail:
    """One point: its row, its steps (`.steps`), and its charts."""

    def __init__(self, row: pd.Series, record: PointRecord):
        self.row, self.record = row, record

    @property
    def steps(self) -> pd.DataFrame | None:
        return self.record.steps

    @property
    def profiled(self) -> bool:
        return self.record.profile is not None

    def title(self) -> str:
        r = self.row
        return (
            f"tp={r.tensor_parallel_size} batch={r.batch_size} in={r.input_len} "
            f"out={r.output_len} ({r['backend']}, {r['mode']})"
        )  # Series.mode is a method

    def timeline(self) -> go.Figure:
        """Every engine step of the point's batches, phases stacked (warm-up batches included:
        the `iteration` column of `.steps` is negative for them)."""
        if self.steps is None or not len(self.steps):
            raise ValueError(f"{self.title()}: no step log (the hf backend has none)")
        fig = profile_charts.step_timeline(self.steps)
        fig.update_layout(title=f"Engine steps: {self.title()}")
        return fig

    def categories(self) -> pd.DataFrame:
        return self._profile()["categories"]

    def operators(self, top: int = 15) -> go.Figure:
        """Time by operator category (prefill vs decode) and the heaviest operators."""
        p = self._profile()
        fig = profile_charts.category_times(p["categories"])
        fig.update_layout(title=f"Time by operator category: {self.title()}")
        ops = p["operators"]
        heavy = (
            ops.groupby(["name", "category"], as_index=False).self_ms.sum().nlargest(top, "self_ms")
        )
        fig2 = go.Figure(
            go.Bar(
                x=heavy.self_ms[::-1],
                y=heavy.name[::-1],
                orientation="h",
                customdata=heavy.category[::-1],
                hovertemplate="%{y}: %{x:.2f} ms (%{customdata})<extra></extra>",
            )
        )
        fig2.update_layout(
            template=charts.TEMPLATE,
            xaxis_title="self ms",
            title=f"The {top} heaviest operators",
            height=120 + 22 * len(heavy),
        )
        return charts.Charts({"categories": fig, "operators": fig2})

    def trace(self, max_events: int = 3000) -> go.Figure:
        """The profiled batch on a time axis: a row per step phase and layer category, a bar per
        range (the `max_events` longest)."""
        return trace_timeline(self._profile()["trace_path"], max_events, self.title())

    def _profile(self) -> dict:
        if self.record.profile is None:
            raise ValueError(f"{self.title()}: not profiled; run the sweep with profile=True")
        return self.record.profile

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        warn = self.row.get("warnings") or ""
        r = self.row
        display(
            HTML(
                f"<b>{html.escape(self.title())}</b>: {r.avg_latency_s:.4g} s "
                f"(95% CI {r.latency_ci_low_s:.4g} to {r.latency_ci_high_s:.4g}),"
                f" {r.floor_fraction:.0%} of the floor"
                + (f"; <span style='color:#c00'>{html.escape(warn)}</span>" if warn else "")
            )
        )
        if self.steps is not None:
            display(self.timeline())
        if self.profiled:
            display(self.operators(), self.trace())


def trace_events(path: str | Path) -> pd.DataFrame:
    """The complete ('X') events of a Chrome trace (gzip or not): name, cat, tid, start_ms,
    dur_ms."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    rows = [
        (e.get("name", ""), e.get("cat", ""), e.get("tid"), e["ts"] / 1e3, e["dur"] / 1e3)
        for e in events
        if e.get("ph") == "X" and "dur" in e
    ]
    df = pd.DataFrame(rows, columns=["name", "cat", "tid", "start_ms", "dur_ms"])
    df["start_ms"] -= df.start_ms.min() if len(df) else 0
    return df


def trace_timeline(path: str | Path, max_events: int = 3000, title: str = "") -> go.Figure:
    ev = trace_events(path)
    lane = ev.name.where(ev.name.isin(PHASES) | ev.name.str.startswith("labkit::"), "operators")
    ev = ev.assign(lane=lane.str.removeprefix("labkit::"))
    ev = ev.nlargest(max_events, "dur_ms")
    order = (
        [p for p in PHASES if p in set(ev.lane)]
        + sorted(set(ev.lane) - set(PHASES) - {"operators"})
        + ["operators"]
    )
    fig = go.Figure(
        layout=dict(
            template=charts.TEMPLATE,
            barmode="overlay",
            title=f"Trace: {title}" if title else "Trace",
            xaxis_title="ms from the start",
            height=160 + 30 * len(order),
        )
    )
    for name in order:
        part = ev[ev.lane == name]
        if not len(part):
            continue
        fig.add_bar(
            y=[name] * len(part),
            x=part.dur_ms,
            base=part.start_ms,
            orientation="h",
            name=name,
            customdata=part.name,
            hovertemplate="%{customdata}: %{x:.3f} ms at %{base:.2f} ms<extra></extra>",
        )
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])
    return fig
