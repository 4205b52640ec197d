"""The lab: labkit.sweep() and its charts and files, the dashboard, labkit.profile(),
and `labkit sweep`."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import pandas as pd
import plotly.graph_objects as go
import pytest

import labkit
from labkit import SamplingParams
from labkit.lab import charts, roofline, sweeps
from labkit.lab.profiling import CATEGORIES


@pytest.fixture(scope="module")
def default_sweep():
    """The issue's acceptance call on the default model, at one timed iteration per point."""
    return labkit.sweep(
        batch_sizes=[1, 4],
        input_lens=[32, 128],
        output_lens=[16],
        num_iters=1,
        num_iters_warmup=0,
        progress=False,
    )


@pytest.mark.slow
def test_sweep_has_a_filled_row_per_point(default_sweep):
    df = default_sweep.df
    assert list(df.columns) == sweeps.COLUMNS
    assert sorted(zip(df.batch_size, df.input_len)) == [(1, 32), (1, 128), (4, 32), (4, 128)]
    # One timed iteration: no spread, no p90 / p99 (they'd be that one sample).
    measured = df[[c for c in sweeps.METRIC_COLUMNS if c not in ("p90_latency_s", "p99_latency_s")]]
    assert measured.notna().all().all(), measured.columns[measured.isna().any()].tolist()
    assert (df.ttft_s < df.avg_latency_s).all() and (df.tpot_s > 0).all()
    assert ((df.peak_kv_usage > 0) & (df.peak_kv_usage <= 1)).all()
    assert (df.floor_fraction > 0).all() and (df.floor_latency_s < df.avg_latency_s * 2).all()
    env = default_sweep.meta["environment"]
    assert env["device_name"] and env["torch"] and env["labkit"] == labkit.__version__


@pytest.mark.slow
def test_sweep_plots_saves_and_compares(default_sweep, tmp_path):
    figs = default_sweep.plot()
    assert set(figs) == set(charts.KINDS) and all(isinstance(f, go.Figure) for f in figs.values())
    # Every chart drawn; the TP speed-up says it has one TP size to show.
    assert all(len(f.data) > 0 for k, f in figs.items() if k != "tp_speedup")
    assert "one TP size" in figs["tp_speedup"].layout.annotations[0].text
    # The roofline: each marker labelled by its point, the ceilings' values and the ridge marked.
    roof = figs["roofline"]
    assert list(roof.data[0].text) == ["b1 i32 o16", "b4 i32 o16", "b1 i128 o16", "b4 i128 o16"]
    marks = " ".join(a.text for a in roof.layout.annotations)
    assert "ridge" in marks and "GB/s" in marks and "GFLOP/s" in marks
    again = labkit.load_sweep(default_sweep.save(tmp_path / "s.json"))
    assert again.df.equals(default_sweep.df) and again.meta == default_sweep.meta
    cmp = default_sweep.compare(again)
    assert cmp.labels == ("before", "after") and len(cmp.df) == 4
    other_mode = labkit.load_sweep(tmp_path / "s.json")
    other_mode.meta["params"]["mode"] = "throughput"
    with pytest.raises(ValueError, match="mode='latency'.*mode='throughput'"):
        default_sweep.compare(other_mode)
    assert (cmp.df.avg_latency_s_ratio == 1).all()
    assert isinstance(cmp.plot("ttft_s"), go.Figure)


def test_load_sweep_refuses_other_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"elapsed_time": 1.0}))
    with pytest.raises(ValueError, match="not a labkit sweep"):
        labkit.load_sweep(tmp_path / "x.json")


def test_sweep_arguments_are_checked():
    with pytest.raises(ValueError, match="mode='throughput'"):
        labkit.sweep(backend="hf")
    with pytest.raises(ValueError, match="mode="):
        labkit.sweep(mode="fast")
    with pytest.raises(ValueError, match="empty sweep"):
        labkit.sweep(batch_sizes=[])


def test_labkit_vs_hf_on_a_tiny_checkpoint(tiny_ckpts):
    model = str(tiny_ckpts["llama"])
    grid = dict(batch_sizes=[1, 2], input_lens=[8], output_lens=[4], num_iters=1, progress=False)
    lk = labkit.sweep(model, mode="throughput", **grid)
    hf = labkit.sweep(model, mode="throughput", backend="hf", num_iters_warmup=0, **grid)
    assert hf.df.peak_kv_usage.isna().all()  # transformers has no paged cache to report
    measured = hf.df[
        [
            c
            for c in sweeps.METRIC_COLUMNS
            if c not in ("peak_kv_usage", "p90_latency_s", "p99_latency_s")
        ]
    ]
    assert measured.notna().all().all()
    cmp = lk.compare(hf)
    assert cmp.labels == ("labkit", "hf") and list(cmp.df.batch_size) == [1, 2]
    assert (cmp.df.output_tok_s_ratio > 0).all()


def test_batches_are_cut_where_the_engine_idles():
    log = pd.DataFrame(
        {  # two batches: prefill, 2 decodes / prefill, decode
            "start_time": [0.0, 0.1, 0.2, 1.0, 1.3],
            "total_ms": [100.0, 50, 50, 300, 50],
            "num_prefill_tokens": [8, 0, 0, 8, 0],
            "num_running": [2, 2, 0, 2, 0],
            "num_waiting": [0, 0, 0, 0, 0],
            "kv_blocks_used": [2, 2, 0, 4, 0],
            "kv_blocks_free": [6, 6, 8, 4, 8],
        }
    )
    first, second = sweeps.split_batches(log)
    assert len(first) == 3 and len(second) == 2
    assert sweeps.batch_times(first, False) == pytest.approx((0.1, 0.25, 0.25))
    assert sweeps.batch_times(second, False) == pytest.approx((0.3, 0.35, 0.5))
    # Async scheduling: a prefill's tokens come in during the next step's record.
    assert sweeps.batch_times(first, True) == pytest.approx((0.15, 0.25, 0.25))
    assert sweeps.batch_times(second, True) == pytest.approx((0.35, 0.35, 0.5))


def test_floor_of_a_moe_model_counts_the_experts_a_step_reads():
    shape = roofline.ModelShape(
        layers=2,
        hidden=8,
        heads=2,
        kv_heads=1,
        head_dim=4,
        intermediate=16,
        vocab=32,
        elem_bytes=4,
        moe_layers=2,
        experts=4,
        experts_per_tok=2,
        expert_intermediate=6,
    )
    attn, expert, router, head = 2 * (2 * 8 * 8 + 2 * 8 * 4), 3 * 8 * 6, 8 * 4, 32 * 8
    # A token multiplies its 2 experts' weights (and the router), not all 4.
    assert shape.body_params == attn + 2 * (2 * expert + router)
    # One token reads 2 experts per layer; many tokens spread over all 4 (uniform routing).
    assert shape.weight_bytes_for(1) == 4 * (attn + 2 * (2 * expert + router) + head)
    assert shape.weight_bytes == 4 * (attn + 2 * (4 * expert + router) + head)
    assert shape.weight_bytes_for(1) < shape.weight_bytes_for(3) < shape.weight_bytes
    assert shape.weight_bytes_for(64) == pytest.approx(shape.weight_bytes, rel=1e-6)


def test_moe_shape_from_a_checkpoint_config(tiny_ckpts):
    from labkit.config import EngineConfig
    from labkit.engine.resolved_config import resolve

    config = resolve(EngineConfig(model=str(tiny_ckpts["qwen3_moe"]), dtype="float32"))
    shape = roofline.ModelShape.from_config(config)
    mc = config.model_config
    assert shape.experts == mc.num_experts > 0 and shape.experts_per_tok == mc.num_experts_per_tok
    assert shape.moe_layers == sum(mc.is_moe_layer(i) for i in range(mc.num_hidden_layers)) > 0


def test_floor_counts_weights_kv_and_flops():
    shape = roofline.ModelShape(
        layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, elem_bytes=4
    )
    assert shape.body_params == 2 * (2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16)
    ceil = roofline.Ceilings("test", "float32", bytes_per_s=1e9, flops_per_s=1e9, threads=1)
    prefill, decode = roofline.batch_work(shape, 3, 5, 3, ceil)  # batch 3, input 5, output 3
    params = shape.body_params + shape.head_params
    # Two decode steps, contexts 6 and 7: every weight once, every context token's K and V.
    assert decode.bytes == 2 * shape.weight_bytes + 3 * (6 + 7) * shape.kv_bytes_per_token
    assert decode.flops == 2 * 3 * 2 * params + 3 * (
        shape.attention_flops(6) + shape.attention_flops(7)
    )
    assert prefill.flops == (
        2 * shape.body_params * 15 + 2 * shape.head_params * 3 + 3 * shape.attention_flops(15)
    )  # 1 + 2 + ... + 5 query-key pairs
    # Step by step the slower of moving the bytes and doing the FLOPs, at 1e9 of each per second.
    assert decode.floor_s == pytest.approx(
        sum(
            max(
                shape.weight_bytes + 3 * ctx * shape.kv_bytes_per_token,
                3 * (2 * params + shape.attention_flops(ctx)),
            )
            for ctx in (6, 7)
        )
        / 1e9
    )


def test_ceilings_are_measured_once_and_cached(tmp_path, monkeypatch):
    measured = [
        roofline.Ceilings("cpu0", "float32", 1e10, 1e11, 2),
        roofline.Ceilings("cpu0", "float32", 2e10, 5e10, 2),
    ]
    monkeypatch.setattr(roofline, "measure", lambda device, dtype: measured.pop(0))
    cache = tmp_path / "ceilings.json"
    assert roofline.ceilings("cpu", cache_file=cache).flops_per_s == 1e11
    assert roofline.ceilings("cpu", cache_file=cache).flops_per_s == 1e11 and len(measured) == 1
    # Measured again: the better of each figure stays (a busy machine measures low).
    again = roofline.ceilings("cpu", refresh=True, cache_file=cache)
    assert (again.bytes_per_s, again.flops_per_s) == (2e10, 1e11)


@pytest.mark.slow
def test_profile_attributes_the_wall_time(default_llm, tmp_path):
    prompts = ["The capital of France is", "Hello, my name is", "The future of AI is", "One, two,"]
    report = labkit.profile(
        default_llm, prompts, SamplingParams(temperature=0, max_tokens=8), trace_dir=tmp_path
    )
    assert isinstance(report.timeline(), go.Figure) and isinstance(
        report.category_chart(), go.Figure
    )
    table = report.categories
    assert list(table.index) == list(CATEGORIES)
    # The acceptance: category times sum to within 10% of the profiled region's wall time.
    assert 0.9 <= table.total_ms.sum() / report.wall_ms <= 1.0 + 1e-9, (table, report.wall_ms)
    assert len(report.steps) == 8 and report.steps.num_prefill_tokens.iloc[0] > 0
    for cat in ("attention", "matmul", "norm/rope/activation", "sampling", "engine"):
        assert table.loc[cat, "prefill_ms"] > 0 and table.loc[cat, "decode_ms"] > 0, cat
    assert table.loc["communication", "total_ms"] == 0  # one rank
    assert json.loads(gzip.open(report.trace_path).read())["traceEvents"]
    assert [o.outputs[0].token_ids for o in report.outputs] and len(report.outputs) == 4
    text = repr(report)  # printing shows a summary, not the DataFrames
    assert text.startswith("profile: 8 steps") and len(text.splitlines()) <= 7, text
    model = default_llm.engine.runner.model  # the labelling hooks are gone again
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_dashboard_runs_stops_and_exports(tiny_ckpts, tmp_path):
    d = labkit.dashboard(
        str(tiny_ckpts["llama"]),
        batch_sizes=[1, 2],
        input_lens=[8],
        output_lens=[3],
        export_dir=tmp_path,
    )
    d.run_button.click()  # the sweep runs on a thread: the kernel stays free for Stop
    d.wait(300)
    assert (
        len(d.result.df) == 2
        and d.progress.value == 2
        and d.status.value.startswith("done: 2 points")
    )
    assert set(d.charts) == {"latency", "throughput", "floor"}
    assert all([len(t.x) for t in c.widget.data] == [2] for c in d.charts.values())
    d.csv_button.click()
    d.json_button.click()
    assert len(pd.read_csv(tmp_path / "sweep.csv")) == 2
    assert labkit.load_sweep(tmp_path / "sweep.jsonl").df.equals(d.result.df)
    # Stop: the point in progress finishes, no further one starts, the rows so far stay.
    d.batch_sizes.value, d.output_lens.value = "1, 2, 4, 8", "24"
    d.run_button.click()
    while d.progress.value < 1 and d.thread.is_alive():
        time.sleep(0.02)
    d.stop_button.click()
    d.wait(300)
    assert 1 <= len(d.result.df) < 4 and d.result.interrupted
    assert d.status.value.startswith(f"stopped after {len(d.result.df)} of 4 points"), (
        d.status.value
    )
    assert not d.run_button.disabled and d.stop_button.disabled
    d.batch_sizes.value = "one"
    d.run_button.click()  # a bad field is reported beside the controls, not raised
    assert "ValueError" in d.status.value and not d.run_button.disabled


def test_cli_sweep_writes_dataframe_and_offline_report(tiny_ckpts, tmp_path):
    from labkit.cli import main

    out = tmp_path / "out"
    assert (
        main(
            [
                "sweep",
                "--model",
                str(tiny_ckpts["llama"]),
                "--batch-sizes",
                "1",
                "2",
                "--input-lens",
                "8",
                "--output-lens",
                "4",
                "--num-iters",
                "1",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    result = labkit.load_sweep(out / "sweep.jsonl")
    assert len(result.df) == 2 and len(pd.read_csv(out / "sweep.csv")) == 2
    html = (out / "sweep.html").read_text()
    # Self-contained: plotly.js inlined (no script from a CDN), one chart per kind.
    assert "<script src=" not in html and html.count("Plotly.newPlot") == len(charts.KINDS)


def test_import_labkit_stays_light():
    code = (
        "import sys, labkit; heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('plotly', 'ipywidgets', 'IPython')]; assert not heavy, heavy; labkit.sweep"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
