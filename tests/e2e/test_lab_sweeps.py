"""A sweep that survives: interrupted (rows kept, engine closed), arguments checked before any
model loads, its file written point by point and resumed; the spread and machine state of every
point."""

from __future__ import annotations

import _thread
import dataclasses
import gc
import json
import math
import threading

import pytest

import labkit
from labkit import LLM
from labkit.lab import machine, sweep_file

TINY_GRID = dict(input_lens=[8], output_lens=[4], num_iters=2, num_iters_warmup=0, progress=False)


def _open_engines(model: str) -> list[LLM]:
    gc.collect()
    return [
        o
        for o in gc.get_objects()
        if type(o) is LLM and o.engine is not None and str(o.config.model) == model
    ]


def test_interrupted_sweep_keeps_its_rows_and_closes_its_engine(tiny_ckpts, tmp_path):
    # A copy of the checkpoint of its own, so no shared fixture's engine counts as ours.
    import shutil

    model = str(shutil.copytree(tiny_ckpts["llama"], tmp_path / "ckpt"))
    out = tmp_path / "s.jsonl"
    timers = []

    def on_point(df):
        # After the second point, Ctrl-C from another thread while the third one runs.
        if len(df) == 2:
            timers.append(threading.Timer(0.2, _thread.interrupt_main))
            timers[-1].start()

    # 256 output tokens a point (about a second here): the interrupt lands inside the third.
    result = labkit.sweep(
        model,
        batch_sizes=[1, 2, 4],
        input_lens=[8],
        output_lens=[256],
        num_iters=1,
        num_iters_warmup=0,
        progress=False,
        on_point=on_point,
        output=out,
    )
    assert result.interrupted and len(result.df) == 2
    assert list(result.df.batch_size) == [1, 2]
    assert labkit.last_sweep() is result
    assert _open_engines(model) == []  # closed: weights and KV cache released
    again = labkit.load_sweep(out)
    assert again.df.equals(result.df) and again.meta["interrupted"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails any test that builds an engine."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LLM, "__init__", refuse)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(batch_sizes=[1, 4, 0]), "batch_sizes=.*0 is not a positive integer"),
        (dict(input_lens=[8, "16"]), "input_lens"),
        (dict(tensor_parallel_sizes=[1.5]), "tensor_parallel_sizes"),
        (dict(output_lens=[]), "empty sweep"),
        (dict(num_iters=0), "num_iters"),
        (dict(on_interrupt="ignore"), "on_interrupt"),
        (dict(no_such_engine_flag=1), "no_such_engine_flag"),
    ],
)
def test_every_argument_is_checked_before_a_model_loads(tiny_ckpts, no_model_loads, bad, match):
    args = dict(dict(TINY_GRID, batch_sizes=[1]), **bad)
    with pytest.raises((ValueError, TypeError), match=match):
        labkit.sweep(str(tiny_ckpts["llama"]), **args)


def test_resume_refuses_another_sweeps_file(tiny_ckpts, tmp_path, no_model_loads):
    path = tmp_path / "old.jsonl"
    path.write_text(
        json.dumps(
            {
                "format": sweep_file.FORMAT,
                "meta": {"params": {"model": "other", "mode": "latency", "backend": "labkit"}},
            }
        )
        + "\n"
    )
    with pytest.raises(ValueError, match="model="):
        labkit.sweep(str(tiny_ckpts["llama"]), batch_sizes=[1], resume=path, **TINY_GRID)


def test_file_grows_point_by_point_and_resume_runs_only_the_missing(tiny_ckpts, tmp_path):
    model, path = str(tiny_ckpts["llama"]), tmp_path / "sweep.jsonl"
    lines = []
    first = labkit.sweep(
        model,
        batch_sizes=[1, 2],
        output=path,
        **TINY_GRID,
        on_point=lambda df: lines.append(len(path.read_text().splitlines())),
    )
    assert lines == [2, 3]  # the header, then one line per point as it finishes
    started = []
    second = labkit.sweep(
        model, batch_sizes=[1, 2, 4], resume=path, **TINY_GRID, on_start=started.append
    )
    assert [p.batch_size for p in started] == [4]
    assert list(second.df.batch_size) == [1, 2, 4]
    assert second.df.iloc[:2].drop(columns="warnings").equals(first.df.drop(columns="warnings"))
    reloaded = labkit.load_sweep(path)  # the same file grew
    assert list(reloaded.df.batch_size) == [1, 2, 4] and reloaded.df.equals(second.df)
    # A last line cut short (a crash mid-write) is skipped, the points before it stand.
    path.write_text(path.read_text() + '{"point": {"model": "tin')
    assert len(labkit.load_sweep(path).df) == 3
    # Every point's step log is kept: its timed batches and its warm-up.
    steps = reloaded.records[0].steps
    assert sorted(steps.iteration.unique()) == [0, 1] and len(steps) == 2 * 4


def test_points_carry_their_spread_and_the_machines_state(tiny_ckpts):
    r = labkit.sweep(str(tiny_ckpts["llama"]), batch_sizes=[2], **dict(TINY_GRID, num_iters=3))
    row = r.df.iloc[0]
    assert row.num_iters == 3 and row.latency_std_s > 0
    assert row.latency_ci_low_s <= row.avg_latency_s <= row.latency_ci_high_s
    assert row.output_tok_s_ci_low <= row.output_tok_s <= row.output_tok_s_ci_high
    assert math.isnan(row.p90_latency_s) and math.isnan(row.p99_latency_s)  # 3 samples
    assert row.load_avg_1m >= 0 and 0 <= row.other_cpu_frac <= 1
    assert math.isnan(row.gpu_util_pct)  # a CPU run
    assert isinstance(row.warnings, str)
    for kind in ("latency", "throughput", "floor"):  # the 95% interval as error bars
        bars = r.plot(kind).data[0].error_y
        assert bars.array is not None and bars.arrayminus is not None, kind


def test_spread_and_warnings():
    tight = machine.Spread.of([1.0, 1.01, 0.99])
    assert tight.ci_low < 1.0 < tight.ci_high and tight.ci_fraction < 0.05
    assert machine.warnings(tight, {"other_cpu_frac": 0.0, "load_avg_1m": 0.0}) == []
    wild = machine.Spread.of([9.6, 2.2, 2.3])  # the same point minutes apart
    assert wild.ci_fraction > 1 and wild.ci_low >= 2.2  # clamped to what was measured
    said = machine.warnings(wild, {"other_cpu_frac": 0.5, "load_avg_1m": 100.0})
    assert [w.split(":")[0].split(" ")[0] for w in said] == ["noisy", "busy", "load"]
    assert machine.warnings(machine.Spread.of([1.0]), {}) == ["1 timed iteration: spread unknown"]
    assert math.isnan(machine.percentile([1.0] * 8, 90))
    assert machine.percentile([1.0] * 9, 90) == 1.0 and machine.percentile([2.0], 50) == 2.0


def test_a_point_beating_the_ceilings_measures_them_again(tiny_ckpts, monkeypatch):
    from labkit.lab import roofline

    real, calls = roofline.ceilings, []

    def ceilings(device, dtype, refresh=False):
        calls.append(refresh)
        c = real(device, dtype)
        # A stale cached figure, a thousandth of the real one, until measured again.
        return (
            c
            if refresh
            else roofline.Ceilings(
                c.device_name, c.dtype, c.bytes_per_s / 1e3, c.flops_per_s / 1e3, c.threads
            )
        )

    monkeypatch.setattr(roofline, "ceilings", ceilings)
    r = labkit.sweep(str(tiny_ckpts["llama"]), batch_sizes=[1, 2], **TINY_GRID)
    assert calls == [False, True] and r.meta["ceilings_remeasured"]
    assert (r.df.bw_fraction < 1).all() and (r.df.flops_fraction < 1).all()


def test_points_written_before_the_ceilings_are_measured_again_are_rewritten(
    tiny_ckpts, monkeypatch, tmp_path
):
    from labkit.lab import roofline, sweep_run

    real = roofline.ceilings
    stale = lambda device, dtype, refresh=False: (  # noqa: E731
        real(device, dtype)
        if refresh
        else dataclasses.replace(real(device, dtype), bytes_per_s=1e6, flops_per_s=1e6)
    )
    seen = []
    # Only the second point counts as beating them, so the first is already in the file.
    beats = lambda row: bool(seen.append(row)) or len(seen) == 2  # noqa: E731
    monkeypatch.setattr(roofline, "ceilings", stale)
    monkeypatch.setattr(sweep_run, "beats_ceilings", beats)
    path = tmp_path / "s.jsonl"
    r = labkit.sweep(str(tiny_ckpts["llama"]), batch_sizes=[1, 2], output=path, **TINY_GRID)
    assert r.meta["ceilings_remeasured"] and (r.df.bw_fraction < 1).all()
    again = labkit.load_sweep(path)
    assert again.df.equals(r.df) and again.meta["ceilings"] == r.meta["ceilings"]


def test_a_point_opens_to_its_steps_operators_and_trace(tiny_ckpts, tmp_path):
    r = labkit.sweep(
        str(tiny_ckpts["llama"]),
        batch_sizes=[1, 2],
        profile=True,
        profile_dir=tmp_path / "traces",
        output=tmp_path / "s.jsonl",
        **TINY_GRID,
    )
    p = r.slowest()
    assert p.row.batch_size in (1, 2)
    timeline = r.point(1).timeline()
    assert len(timeline.data) and "batch=2" in timeline.layout.title.text
    assert r.point(1).title().endswith("(labkit, latency)"), r.point(1).title()
    assert len(r.point(1).steps) == 2 * 4  # two timed batches of four steps
    ops = r.point(1).operators()
    assert set(ops) == {"categories", "operators"} and len(ops["operators"].data[0].x) > 0
    assert r.point(1).categories().loc["matmul"].total_ms > 0
    trace = r.point(1).trace()
    lanes = {t.name for t in trace.data}
    assert {"forward", "sample", "matmul", "attention", "operators"} <= lanes, lanes
    assert all(len(t.x) > 0 for t in trace.data)
    # The file keeps it all: a reloaded sweep opens the same way.
    again = labkit.load_sweep(tmp_path / "s.jsonl")
    assert again.point(1).categories().equals(r.point(1).categories())
    assert len(again.point(1).trace().data) == len(trace.data)
    unprofiled = labkit.sweep(str(tiny_ckpts["llama"]), batch_sizes=[1], **TINY_GRID)
    with pytest.raises(ValueError, match="profile=True"):
        unprofiled.point(0).operators()


def test_live_chart_drops_stale_series_when_tp_varies():
    import pandas as pd

    from labkit.lab import charts, live

    if not charts.has_widgets():
        pytest.skip("no FigureWidget here")
    row = dict(
        model="m",
        backend="labkit",
        batch_size=1,
        input_len=8,
        output_len=4,
        avg_latency_s=1.0,
        latency_ci_low_s=0.9,
        latency_ci_high_s=1.1,
        output_tok_s=4.0,
        output_tok_s_ci_low=3.6,
        output_tok_s_ci_high=4.4,
        floor_latency_s=0.5,
        floor_fraction=0.5,
        warnings="",
    )
    tp1 = pd.DataFrame([dict(row, tensor_parallel_size=1)])
    both = pd.DataFrame([dict(row, tensor_parallel_size=1), dict(row, tensor_parallel_size=2)])
    # Not told the TP sizes: the tp=1 series is renamed once tp=2 arrives; the old name goes.
    chart = live.LiveChart()
    chart.update(tp1)
    chart.update(both)
    assert sorted(t.name for t in chart.widget.data) == ["in=8 out=4 tp=1", "in=8 out=4 tp=2"]
    # Told them: named for the whole sweep from the first point on.
    chart = live.LiveChart(tp_sizes=[1, 2])
    chart.update(tp1)
    assert [t.name for t in chart.widget.data] == ["in=8 out=4 tp=1"]


def test_cli_sweep_interrupted_keeps_its_files_and_resumes(tiny_ckpts, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "labkit.cli",
        "sweep",
        "--model",
        str(tiny_ckpts["llama"]),
        "--batch-sizes",
        "1",
        "2",
        "4",
        "--input-lens",
        "8",
        "--output-lens",
        "64",
        "--num-iters",
        "1",
        "--num-iters-warmup",
        "0",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jsonl = out / "sweep.jsonl"
    deadline = time.monotonic() + 120
    # Ctrl-C once the first point is in the file (the header and one point line).
    while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    done = len(pd.read_csv(out / "sweep.csv"))
    assert 1 <= done < 3 and (out / "sweep.html").exists() and "--resume" in output
    # Resumed: only the missing points run, the file ends with all three.
    resumed = subprocess.run(
        cmd + ["--resume", str(jsonl)], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert list(labkit.load_sweep(jsonl).df.batch_size) == [1, 2, 4]
