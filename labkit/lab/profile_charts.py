"""Plotly figures of an engine run's steps and of a profile's operator categories (a sweep
point's drill-down, labkit.profile()).

Each takes the DataFrame it draws (a step log, a category table), so a saved result draws the
same."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.lab.charts import PHASES, TEMPLATE


def step_timeline(steps: pd.DataFrame) -> go.Figure:
    """Per engine step: its phases stacked (ms); below, the batch's prefill and decode sequences
    and the KV cache in use; preempting steps marked."""
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.65, 0.35],
        vertical_spacing=0.06,
        specs=[[{}], [{"secondary_y": True}]],
    )
    for col in PHASES:
        fig.add_bar(x=steps.step, y=steps[col], name=col.removesuffix("_ms"), row=1, col=1)
    pre = steps[steps.num_preemptions > 0]
    if len(pre):
        fig.add_scatter(
            x=pre.step,
            y=pre.total_ms,
            mode="markers",
            name="preemption",
            row=1,
            col=1,
            marker=dict(symbol="x", size=11, color="red"),
            customdata=pre.num_preemptions,
            hovertemplate="step %{x}: %{customdata} preempted<extra></extra>",
        )
    fig.add_bar(
        x=steps.step,
        y=steps.num_prefill_seqs,
        name="prefill seqs",
        row=2,
        col=1,
        marker_color="#636efa",
        opacity=0.6,
    )
    fig.add_bar(
        x=steps.step,
        y=steps.num_decode_seqs,
        name="decode seqs",
        row=2,
        col=1,
        marker_color="#00cc96",
        opacity=0.6,
    )
    kv = 100 * steps.kv_blocks_used / (steps.kv_blocks_used + steps.kv_blocks_free)
    fig.add_scatter(
        x=steps.step,
        y=kv,
        name="KV cache used (%)",
        mode="lines",
        line_color="black",
        row=2,
        col=1,
        secondary_y=True,
    )
    fig.update_layout(template=TEMPLATE, barmode="stack", title="Engine steps", height=560)
    fig.update_yaxes(title_text="ms", row=1, col=1)
    fig.update_yaxes(title_text="sequences", row=2, col=1)
    fig.update_yaxes(title_text="KV %", row=2, col=1, secondary_y=True, rangemode="tozero")
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig


def category_times(categories: pd.DataFrame) -> go.Figure:
    """A profile's category table as stacked bars, one per phase (prefill, decode)."""
    phases = [c for c in categories.columns if c.endswith("_ms") and c != "total_ms"]
    fig = go.Figure(
        layout=dict(
            template=TEMPLATE, barmode="stack", title="Time by operator category", xaxis_title="ms"
        )
    )
    for cat, row in categories.iterrows():
        fig.add_bar(
            y=[p.removesuffix("_ms") for p in phases],
            x=[row[p] for p in phases],
            name=str(cat),
            orientation="h",
        )
    return fig
