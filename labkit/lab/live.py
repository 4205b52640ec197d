"""What a running sweep shows: a status line and a chart that fills in as points finish.

In a notebook both are display outputs with a display id: the status line is HTML, updated in
place; the chart is a plotly FigureWidget while the sweep runs and is replaced by a static plotly
figure when it ends, so a saved or exported notebook (nbconvert, GitHub) shows the chart, not a
widget's text. Outside a notebook the status is a tqdm bar and there is no chart.
"""

from __future__ import annotations

import html
import time

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from labkit.lab import charts

# An empty sweep frame: what a live chart draws before the first point.
EMPTY = pd.DataFrame(
    {
        c: pd.Series(dtype=t)
        for c, t in [
            ("model", str),
            ("tensor_parallel_size", int),
            ("backend", str),
            ("batch_size", int),
            ("input_len", int),
            ("output_len", int),
            ("avg_latency_s", float),
            ("latency_ci_low_s", float),
            ("latency_ci_high_s", float),
            ("output_tok_s", float),
            ("output_tok_s_ci_low", float),
            ("output_tok_s_ci_high", float),
            ("floor_latency_s", float),
            ("floor_fraction", float),
            ("warnings", str),
        ]
    }
)


def mimebundle(fig: go.Figure) -> dict:
    """A static figure's output: plotly's JSON (rendered by JupyterLab, VS Code, nbviewer) and
    an HTML fallback with plotly.js from its CDN (nbconvert's HTML, GitHub shows neither
    widget nor script, but keeps the text)."""
    import json

    return {
        "application/vnd.plotly.v1+json": json.loads(fig.to_json()) | {"config": {}},
        "text/html": fig.to_html(full_html=False, include_plotlyjs="cdn"),
        "text/plain": f"<plotly figure: {fig.layout.title.text or ''}>",
    }


class LiveChart:
    """A FigureWidget of one sweep chart (latency by default) that fills in as points finish.
    `tp_sizes`: the TP sizes the sweep will run, so the series are named the same from the
    first point on; series no longer drawn are removed."""

    def __init__(self, kind: str = "latency", tp_sizes=(1,)):
        self.kind, self.tp_sizes, self.handle = kind, tuple(tp_sizes), None
        self.widget = go.FigureWidget(self.figure(EMPTY))

    def figure(self, df: pd.DataFrame) -> go.Figure:
        return charts.KINDS[self.kind](df, ceilings=None, tp_sizes=self.tp_sizes)

    def show(self) -> None:
        from IPython.display import display

        self.handle = display(self.widget, display_id=True)

    def update(self, df: pd.DataFrame) -> None:
        fresh = self.figure(df)
        names = [t.name for t in fresh.data]
        with self.widget.batch_update():
            # A series named otherwise now (the TP sizes grew) goes: no stale line stays.
            self.widget.data = [t for t in self.widget.data if t.name in names]
            have = {t.name: t for t in self.widget.data}
            for trace in fresh.data:
                if trace.name in have:
                    have[trace.name].update(trace.to_plotly_json())
                else:
                    self.widget.add_trace(trace)
            self.widget.layout.update(fresh.layout.to_plotly_json())

    def freeze(self, df: pd.DataFrame) -> None:
        """Replace the widget by a static figure of `df` (where it was displayed)."""
        if self.handle is not None:
            self.handle.update(mimebundle(self.figure(df)), raw=True)


class Status:
    """The sweep's status line: points done of total, the point running, elapsed time, the
    end (done, stopped, interrupted, failed)."""

    def __init__(self, total: int, desc: str, *, notebook: bool, enabled: bool = True):
        self.total, self.desc, self.done, self.start = total, desc, 0, time.monotonic()
        self.handle = self.bar = None
        if enabled and notebook:
            from IPython.display import HTML, display

            self.handle = display(HTML(self._html("starting")), display_id=True)
        elif enabled:
            self.bar = tqdm(total=total, desc=desc)

    def _html(self, what: str) -> str:
        elapsed = time.monotonic() - self.start
        return (
            f"<b>{html.escape(self.desc)}</b>: {self.done} / {self.total} points, "
            f"{elapsed:.0f} s; {html.escape(what)}"
        )

    def running(self, point) -> None:
        self._show(f"running {point}")
        if self.bar is not None:
            self.bar.set_postfix_str(str(point))

    def finished(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def end(self, what: str) -> None:
        self._show(what)
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.close()

    def _show(self, what: str) -> None:
        if self.handle is not None:
            from IPython.display import HTML

            self.handle.update(HTML(self._html(what)))
