"""Plotly figures of a serving sweep (labkit.lab.serving): the throughput-vs-latency curve, each
metric's distribution per load (CDFs), and goodput against the offered load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.lab.charts import TEMPLATE, Charts


def load_labels(df: pd.DataFrame) -> list[str]:
    """A point's offered load: its request rate and concurrency limit."""
    out = []
    for rate, conc in zip(df.request_rate, df.max_concurrency):
        r = "all at once" if np.isinf(rate) else f"{rate:g} req/s"
        out.append(r if conc is None or pd.isna(conc) else f"{r}, ≤{int(conc)} in flight")
    return out


def tradeoff(result) -> go.Figure:
    """Output throughput (x) against TTFT and TPOT (median and p99), a marker per load: where
    more throughput starts to cost latency."""
    df = result.df.sort_values("output_throughput")
    labels = load_labels(df)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["TTFT", "TPOT"])
    colours = {"median": "#1f77b4", "p99": "#d62728"}
    for col, metric in enumerate(("ttft", "tpot"), start=1):
        for stat, colour in colours.items():
            fig.add_scatter(
                x=df.output_throughput,
                y=df[f"{stat}_{metric}_ms"],
                mode="lines+markers",
                name=f"{stat}",
                legendgroup=stat,
                showlegend=col == 1,
                line_color=colour,
                text=labels,
                hovertemplate="%{text}: %{x:.4g} tok/s, %{y:.4g} ms"
                f"<extra>{stat} {metric.upper()}</extra>",
                row=1,
                col=col,
            )
        fig.update_yaxes(title_text="ms", row=1, col=col)
        fig.update_xaxes(title_text="output tokens / s", row=1, col=col)
    slos = result.meta.get("goodput_slos_ms", {})
    for col, metric in enumerate(("ttft", "tpot"), start=1):
        if metric in slos:
            fig.add_hline(
                y=slos[metric],
                line=dict(color="black", dash="dot"),
                row=1,
                col=col,
                annotation_text=f"SLO {slos[metric]:g} ms",
            )
    fig.update_layout(template=TEMPLATE, title="Throughput vs latency (a marker per load)")
    return fig


def cdf(result, metric: str = "ttft") -> go.Figure:
    """The empirical CDF of one metric (ttft, tpot, e2el per request; itl per gap), a line per
    load."""
    fig = go.Figure(
        layout=dict(
            template=TEMPLATE,
            title=f"{metric.upper()} distribution (CDF)",
            xaxis_title=f"{metric.upper()} (ms)",
            yaxis_title="fraction of " + ("gaps" if metric == "itl" else "requests"),
        )
    )
    values = (
        result.itls.rename(columns={"itl_ms": "v"})
        if metric == "itl"
        else result.requests.rename(columns={f"{metric}_ms": "v"})
    )
    for i, label in enumerate(load_labels(result.df)):
        v = np.sort(values.v[(values.point == i) & values.v.notna()].to_numpy())
        if len(v):
            fig.add_scatter(
                x=v, y=np.arange(1, len(v) + 1) / len(v), mode="lines", line_shape="hv", name=label
            )
    slo = result.meta.get("goodput_slos_ms", {}).get(metric)
    if slo is not None:
        fig.add_vline(x=slo, line=dict(color="black", dash="dot"), annotation_text="SLO")
    return fig


def goodput(result) -> go.Figure:
    """Requests served per second, and those within every SLO, against the offered load."""
    df = result.df
    labels = load_labels(df)
    fig = go.Figure(
        layout=dict(
            template=TEMPLATE,
            barmode="group",
            yaxis_title="requests / s",
            title="Throughput and goodput by offered load",
        )
    )
    fig.add_bar(x=labels, y=df.request_throughput, name="completed")
    if df.request_goodput.notna().any():
        fig.add_bar(
            x=labels,
            y=df.request_goodput,
            name="within the SLOs",
            customdata=df.goodput_fraction * 100,
            hovertemplate="%{y:.3g} req/s (%{customdata:.0f}%)<extra></extra>",
        )
    return fig


KINDS = {
    "tradeoff": tradeoff,
    "ttft_cdf": lambda r: cdf(r, "ttft"),
    "tpot_cdf": lambda r: cdf(r, "tpot"),
    "itl_cdf": lambda r: cdf(r, "itl"),
    "goodput": goodput,
}


def charts(result, kind: str | None = None):
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: must be one of {', '.join(KINDS)}")
    if kind is not None:
        return KINDS[kind](result)
    return Charts({k: f(result) for k, f in KINDS.items()})
