"""Two sweeps side by side: the points both ran, each metric under both labels and their ratio
(labkit vs hf, before vs after)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import pandas as pd

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger("labkit")


class Sweep(Protocol):
    """What a comparison reads of a sweep (a SweepResult)."""

    df: pd.DataFrame
    meta: dict
    label: str


COMPARED = [
    "avg_latency_s",
    "ttft_s",
    "tpot_s",
    "prefill_tok_s",
    "decode_tok_s",
    "output_tok_s",
    "floor_fraction",
]


@dataclass
class SweepComparison:
    """Per common point: each metric of COMPARED under both labels, and `<metric>_ratio` =
    second / first. `mixed_modes`: the sweeps ran in different modes (compare with care)."""

    df: pd.DataFrame
    labels: tuple[str, str]
    mixed_modes: bool = False

    def plot(self, metric: str = "output_tok_s"):
        fig = comparison_chart(self.df, self.labels, metric)
        if self.mixed_modes:
            fig.update_layout(title=fig.layout.title.text + " (different modes!)")
        return fig

    def _repr_html_(self) -> str:
        return self.df.to_html(index=False, float_format=lambda x: f"{x:.4g}")


def compare_sweeps(
    first: Sweep,
    second: Sweep,
    labels: tuple[str, str] | None = None,
    allow_mode_mismatch: bool = False,
) -> SweepComparison:
    """See SweepResult.compare."""
    modes = [r.meta.get("params", {}).get("mode") for r in (first, second)]
    if modes[0] != modes[1]:
        msg = (
            f"comparing a mode={modes[0]!r} sweep with a mode={modes[1]!r} one: they time "
            "different things; run both in one mode"
        )
        if not allow_mode_mismatch:
            raise ValueError(msg + " (or pass allow_mode_mismatch=True)")
        log.warning(msg)
    if labels is None:
        labels = (first.label, second.label)
        if labels[0] == labels[1]:
            labels = ("before", "after")
    keys = ["tensor_parallel_size", "batch_size", "input_len", "output_len"]
    a, b = (
        r.df[keys + COMPARED].rename(columns={m: f"{m}_{lab}" for m in COMPARED})
        for r, lab in zip((first, second), labels)
    )
    df = a.merge(b, on=keys)
    for m in COMPARED:
        df[f"{m}_ratio"] = df[f"{m}_{labels[1]}"] / df[f"{m}_{labels[0]}"]
    return SweepComparison(df, labels, modes[0] != modes[1])


def comparison_chart(df: pd.DataFrame, labels: tuple[str, str], metric: str) -> go.Figure:
    """A SweepComparison's metric for both labels per point, the ratio in the hover."""
    import plotly.graph_objects as go

    from labkit.lab.charts import TEMPLATE, point_labels

    x = point_labels(df.assign(model="", backend=""))
    fig = go.Figure(
        layout=dict(
            template=TEMPLATE,
            barmode="group",
            title=f"{metric}: {labels[0]} vs {labels[1]}",
            yaxis_title=metric,
        )
    )
    for lab in labels:
        ratio = f"{labels[1]} / {labels[0]} = %{{customdata:.2f}}x"
        fig.add_bar(
            x=x,
            y=df[f"{metric}_{lab}"],
            name=lab,
            customdata=df[f"{metric}_ratio"],
            hovertemplate=f"%{{y:.4g}} ({ratio})<extra>{lab}</extra>",
        )
    return fig
