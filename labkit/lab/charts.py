"""Plotly figures of sweeps: latency, throughput, % of floor, TTFT/TPOT, heatmaps, the roofline,
TP speed-up (profile figures: profile_charts; comparisons: compare; the HTML report: report).

Every function takes the DataFrame it draws (a sweep's `df`), so a saved and reloaded result
draws the same.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

TEMPLATE = "plotly_white"
PHASES = ["schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "postprocess_ms"]


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return type(get_ipython()).__name__ == "ZMQInteractiveShell"


def has_widgets() -> bool:
    """Whether plotly's FigureWidget works here (it needs ipywidgets, and anywidget on
    plotly 6+)."""
    try:
        go.FigureWidget()
    except ImportError:
        return False
    return True


class Charts(dict):
    """Figures by name; as a notebook cell's value it displays every one of them."""

    def _ipython_display_(self) -> None:
        from IPython.display import display

        for fig in self.values():
            display(fig)


# ---- sweeps -------------------------------------------------------------------------------------
# Every sweep chart takes (df, ceilings=None, tp_sizes=()): `tp_sizes` are the TP sizes the sweep
# runs, so a chart drawn while it runs names its series as the finished one will.
def series(df: pd.DataFrame, tp_sizes=()) -> pd.Series:
    """A line's name per row: its sequence lengths, plus TP size, backend and model where the
    sweep has more than one."""
    label = "in=" + df.input_len.astype(str) + " out=" + df.output_len.astype(str)
    if df.tensor_parallel_size.nunique() > 1 or len(set(tp_sizes)) > 1:
        label = label + " tp=" + df.tensor_parallel_size.astype(str)
    for col in ("backend", "model"):
        if df[col].nunique() > 1:
            label = label + " " + df[col].astype(str)
    return label


def point_labels(df: pd.DataFrame, tp_sizes=()) -> pd.Series:
    return "b=" + df.batch_size.astype(str) + " " + series(df, tp_sizes)


def _short_labels(df: pd.DataFrame) -> pd.Series:
    """Compact point labels for marker text: b4 i32 o16 (tp2)."""
    label = (
        "b"
        + df.batch_size.astype(str)
        + " i"
        + df.input_len.astype(str)
        + " o"
        + df.output_len.astype(str)
    )
    if df.tensor_parallel_size.nunique() > 1:
        label = label + " tp" + df.tensor_parallel_size.astype(str)
    return label


def _lines(
    df: pd.DataFrame,
    y: str,
    title: str,
    ytitle: str,
    tp_sizes=(),
    low: str | None = None,
    high: str | None = None,
    scale: float = 1.0,
) -> go.Figure:
    """y against batch size, a line per series; error bars from the `low` / `high` columns
    (the 95 % confidence interval) where they are known."""
    fig = go.Figure(
        layout=dict(template=TEMPLATE, title=title, xaxis_title="batch size", yaxis_title=ytitle)
    )
    for name, part in df.assign(series=series(df, tp_sizes)).groupby("series", sort=False):
        part = part.sort_values("batch_size")
        error = None
        if low and high and part[low].notna().any():
            error = dict(
                type="data",
                symmetric=False,
                array=(part[high] - part[y]) * scale,
                arrayminus=(part[y] - part[low]) * scale,
            )
        fig.add_scatter(
            x=part.batch_size,
            y=part[y] * scale,
            name=name,
            mode="lines+markers",
            error_y=error,
            customdata=part.warnings,
            hovertemplate="batch %{x}: %{y:.4g}<br>%{customdata}<extra>%{fullData.name}</extra>",
        )
    fig.update_xaxes(type="log", tickvals=sorted(df.batch_size.unique()))
    return fig


def latency(df: pd.DataFrame, ceilings: dict | None = None, tp_sizes=()) -> go.Figure:
    return _lines(
        df,
        "avg_latency_s",
        "Latency vs batch size (95% CI)",
        "batch latency (s)",
        tp_sizes,
        "latency_ci_low_s",
        "latency_ci_high_s",
    )


def throughput(df: pd.DataFrame, ceilings: dict | None = None, tp_sizes=()) -> go.Figure:
    return _lines(
        df,
        "output_tok_s",
        "Output throughput vs batch size (95% CI)",
        "output tokens / s",
        tp_sizes,
        "output_tok_s_ci_low",
        "output_tok_s_ci_high",
    )


def floor(df: pd.DataFrame, ceilings: dict | None = None, tp_sizes=()) -> go.Figure:
    """The fraction of the floor each point reached (floor time / measured time; 100 % = the
    fastest the measured ceilings allow)."""
    d = df.assign(
        floor_low=df.floor_latency_s / df.latency_ci_high_s,
        floor_high=df.floor_latency_s / df.latency_ci_low_s,
    )
    fig = _lines(
        d,
        "floor_fraction",
        "% of the floor reached (100% = the machine's floor)",
        "% of floor",
        tp_sizes,
        "floor_low",
        "floor_high",
        scale=100,
    )
    fig.add_hline(y=100, line=dict(color="black", dash="dash"), annotation_text="floor")
    return fig


def heatmap(
    df: pd.DataFrame, ceilings: dict | None = None, tp_sizes=(), metric: str = "output_tok_s"
) -> go.Figure:
    """Batch size × sequence lengths (input/output); other keys that vary are averaged over."""
    seq = df.input_len.astype(str) + "/" + df.output_len.astype(str)
    grid = df.assign(seq=seq).pivot_table(
        index="seq", columns="batch_size", values=metric, aggfunc="mean", sort=False
    )
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=[str(c) for c in grid.columns],
            y=list(grid.index),
            text=grid.map(lambda v: f"{v:.3g}").values,
            texttemplate="%{text}",
            colorbar_title=metric,
            colorscale="Viridis",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=f"{metric} by batch size and sequence length",
        xaxis_title="batch size",
        yaxis_title="input / output tokens",
    )
    return fig


def ttft_tpot(df: pd.DataFrame, ceilings: dict | None = None, tp_sizes=()) -> go.Figure:
    """Each point's batch latency split into time to first token and the decode after it."""
    x = point_labels(df, tp_sizes)
    decode = df.tpot_s * (df.output_len - 1)
    fig = go.Figure(
        layout=dict(
            template=TEMPLATE,
            barmode="stack",
            title="Latency split: TTFT and decode",
            yaxis_title="seconds",
        )
    )
    fig.add_bar(
        x=x,
        y=df.ttft_s,
        name="TTFT (prefill)",
        error_y=dict(type="data", array=df.ttft_std_s, visible=True),
    )
    fig.add_bar(
        x=x,
        y=decode,
        name="decode",
        customdata=df.tpot_s * 1e3,
        hovertemplate="%{y:.3f} s, TPOT %{customdata:.1f} ms<extra>decode</extra>",
    )
    return fig


def roofline(df: pd.DataFrame, ceilings: dict | None = None, tp_sizes=()) -> go.Figure:
    """Achieved FLOP rate vs arithmetic intensity of each point's prefill and decode, under this
    machine's measured ceilings (their values and the ridge point marked). Markers are labelled
    by point; the hover gives the fraction of the ceiling that binds there."""
    fig = go.Figure(
        layout=dict(
            template=TEMPLATE,
            title="Roofline (measured ceilings)",
            xaxis_title="arithmetic intensity (FLOP / byte)",
            yaxis_title="GFLOP/s",
        )
    )
    decode_s = df.tpot_s * (df.output_len - 1)
    # phase: (FLOP per byte, achieved GFLOP/s, fraction of its ceiling, which ceiling)
    phases = {
        "prefill": (
            df.prefill_gflop / df.prefill_gb,
            df.prefill_gflop / df.ttft_s,
            df.flops_fraction,
            "compute",
        ),
        "decode": (
            df.decode_gflop / df.decode_gb,
            df.decode_gflop / decode_s,
            df.bw_fraction,
            "bandwidth",
        ),
    }
    labels, short = point_labels(df, tp_sizes), _short_labels(df)
    # Alternate the label sides so neighbouring points' labels don't sit on each other.
    sides = ["top center", "bottom center", "middle right", "middle left"]
    for name, (ai, gflops, frac, ceiling) in phases.items():
        order = ai.rank(method="first").fillna(0).astype(int)
        fig.add_scatter(
            x=ai,
            y=gflops,
            name=name,
            mode="markers+text",
            text=short,
            textposition=[sides[k % len(sides)] for k in order],
            textfont=dict(size=9),
            customdata=list(zip(labels, frac * 100)),
            hovertemplate=f"%{{customdata[0]}}: %{{y:.3g}} GFLOP/s, "
            f"%{{customdata[1]:.0f}}% of the {ceiling} ceiling"
            f"<extra>{name}</extra>",
        )
    if ceilings:
        bw, peak = ceilings["bytes_per_s"] / 1e9, ceilings["flops_per_s"] / 1e9
        ridge = peak / bw
        ai_all = pd.concat([v[0] for v in phases.values()]).replace([np.inf, -np.inf], np.nan)
        ai_all = ai_all.dropna()
        lo = min([ridge, *ai_all]) / 4
        hi = max([ridge, *ai_all]) * 4
        xs = [lo, ridge, hi]
        fig.add_scatter(
            x=xs,
            y=[min(peak, bw * x) for x in xs],
            name="ceiling",
            mode="lines",
            line=dict(color="black", dash="dash"),
            hovertemplate=f"copy {bw:.3g} GB/s, matmul {peak:.3g} GFLOP/s<extra>ceiling</extra>",
        )
        fig.add_scatter(
            x=[ridge],
            y=[peak],
            name="ridge",
            mode="markers",
            marker=dict(symbol="diamond", size=10, color="black"),
            hovertemplate=f"ridge: {ridge:.3g} FLOP/byte<extra></extra>",
        )
        fig.add_annotation(
            x=np.log10(ridge),
            y=np.log10(peak),
            text=f"ridge {ridge:.3g} FLOP/B",
            showarrow=True,
            ay=-30,
        )
        fig.add_annotation(
            x=np.log10(hi),
            y=np.log10(peak),
            text=f"matmul {peak:.3g} GFLOP/s",
            showarrow=False,
            xanchor="right",
            yanchor="bottom",
        )
        fig.add_annotation(
            x=np.log10(lo),
            y=np.log10(bw * lo),
            text=f"copy {bw:.3g} GB/s",
            showarrow=False,
            xanchor="left",
            yanchor="bottom",
            textangle=-20,
        )
    fig.update_xaxes(type="log", dtick="D2")  # 1, 2, 5 in every decade
    fig.update_yaxes(type="log", dtick="D2")
    return fig


def tp_speedup(df: pd.DataFrame, ceilings: dict | None = None, tp_sizes=()) -> go.Figure:
    """Latency at the smallest TP size / latency at each TP size, a line per point (ideal:
    the dashed line, speed-up = TP ratio)."""
    fig = go.Figure(
        layout=dict(
            template=TEMPLATE,
            title="Speed-up vs tensor-parallel size",
            xaxis_title="tensor-parallel size",
            yaxis_title="speed-up",
        )
    )
    sizes = sorted(df.tensor_parallel_size.unique())
    if len(sizes) < 2:
        fig.add_annotation(
            text="one TP size in this sweep: nothing to compare",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
        )
        return fig
    keys = ["backend", "batch_size", "input_len", "output_len"]
    base = df[df.tensor_parallel_size == sizes[0]].set_index(keys).avg_latency_s
    for key, part in df.groupby(keys, sort=False):
        if key not in base.index:
            continue
        part = part.sort_values("tensor_parallel_size")
        fig.add_scatter(
            x=part.tensor_parallel_size,
            y=base[key] / part.avg_latency_s,
            mode="lines+markers",
            name=f"b={key[1]} in={key[2]} out={key[3]}",
        )
    fig.add_scatter(
        x=sizes,
        y=[s / sizes[0] for s in sizes],
        mode="lines",
        name="ideal",
        line=dict(color="black", dash="dash"),
    )
    fig.update_xaxes(tickvals=sizes)
    return fig


KINDS = {
    "latency": latency,
    "throughput": throughput,
    "floor": floor,
    "heatmap": heatmap,
    "ttft_tpot": ttft_tpot,
    "roofline": roofline,
    "tp_speedup": tp_speedup,
}


def sweep_charts(df: pd.DataFrame, ceilings: dict | None, kind: str | None = None, tp_sizes=()):
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: must be one of {', '.join(KINDS)}")
    if kind is not None:
        return KINDS[kind](df, ceilings, tp_sizes)
    return Charts({k: f(df, ceilings, tp_sizes) for k, f in KINDS.items()})
