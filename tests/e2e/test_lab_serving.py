"""labkit.serving_sweep() against a real `labkit serve`: the trade-off between offered load and
latency, with each metric's distribution and goodput."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest

import labkit
from labkit.lab import serving, serving_charts
from labkit.lab.server_process import ServerProcess


def test_serving_sweep_against_a_real_server(tiny_ckpts, tmp_path):
    model = str(tiny_ckpts["llama"])
    r = labkit.serving_sweep(
        model,
        request_rates=[20.0, math.inf],
        max_concurrencies=[None, 2],
        num_prompts=6,
        input_len=16,
        output_len=6,
        goodput={"ttft": 60_000, "tpot": 60_000},
        output=tmp_path / "s.jsonl",
        progress=False,
    )
    assert not r.interrupted and len(r.df) == 4
    assert r.df.max_concurrency.isna().tolist() == [True, True, False, False]
    assert (r.df.completed == 6).all() and (r.df.failed == 0).all()
    assert r.df.request_goodput.tolist() == pytest.approx(r.df.request_throughput.tolist())
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert (r.df[f"p50_{m}_ms"] <= r.df[f"p99_{m}_ms"]).all()
    # The distributions: every request of every point, every inter-token gap.
    assert len(r.requests) == 24 and r.requests.ttft_ms.notna().all()
    assert (r.requests.output_len == 6).all() and (r.requests.error == "").all()
    assert len(r.itls) == 24 * 5
    figs = r.plot()
    assert set(figs) == set(serving_charts.KINDS)
    assert all(isinstance(f, go.Figure) and len(f.data) for f in figs.values())
    assert len(figs["tradeoff"].data) == 4 and len(figs["ttft_cdf"].data) == 4
    again = serving.load_serving_sweep(tmp_path / "s.jsonl")
    assert again.df.equals(r.df)
    assert len(again.requests) == 24 and len(again.itls) == len(r.itls)


def test_serving_sweep_checks_its_arguments_before_starting_a_server():
    with pytest.raises(ValueError, match="request_rates"):
        labkit.serving_sweep(request_rates=[0])
    with pytest.raises(ValueError, match="max_concurrencies"):
        labkit.serving_sweep(max_concurrencies=[0])
    with pytest.raises(ValueError, match="goodput"):
        labkit.serving_sweep(goodput={"latency": 5})


def test_resume_runs_only_the_missing_points(tiny_ckpts, tmp_path):
    model, path = str(tiny_ckpts["llama"]), tmp_path / "s.jsonl"
    grid = dict(num_prompts=4, input_len=8, output_len=4, progress=False)
    with ServerProcess(model, (), 300) as server:
        first = labkit.serving_sweep(
            model, url=server.url, request_rates=[math.inf], output=path, **grid
        )
        ran = []
        both = labkit.serving_sweep(
            model,
            url=server.url,
            request_rates=[20.0, math.inf],
            output=path,
            resume=path,
            on_point=lambda df: ran.append(len(df)),
            **grid,
        )
        with pytest.raises(ValueError, match="resume: .* ran input_len=8"):
            labkit.serving_sweep(
                model,
                url=server.url,
                request_rates=[1.0],
                resume=path,
                **{**grid, "input_len": 16},
            )
    assert ran == [2]  # one new point, run after the kept one
    assert sorted(both.df.request_rate.tolist()) == [20.0, math.inf]
    kept = both.requests[both.requests.point == both.df.index[both.df.request_rate == math.inf][0]]
    assert kept.ttft_ms.tolist() == first.requests.ttft_ms.tolist()  # not measured again
    assert serving.load_serving_sweep(path).df.equals(both.df)
