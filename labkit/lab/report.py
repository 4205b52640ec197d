"""The offline HTML report of a sweep: its figures (plotly.js inlined once), its environment
and its table, in one file."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd


def write_report(path: str | Path, title: str, figures: dict, df: pd.DataFrame, meta: dict) -> Path:
    """One HTML file, plotly.js inlined once, so it opens offline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0))
        for i, fig in enumerate(figures.values())
    ]
    env = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in {**meta.get("environment", {}), **meta.get("params", {})}.items()
    )
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em} "
        "table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table>{env}</table>"
        + "".join(parts)
        + "<h2>Points</h2>"
        + df.to_html(index=False, float_format=lambda x: f"{x:.4g}")
        + "</body></html>"
    )
    return path
