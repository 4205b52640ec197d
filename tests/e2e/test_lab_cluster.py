"""labkit.sweep(..., cluster="local") on a 2-CPU local Ray instance shared by this module's tests
(started by its first test's fixture, shut down at the module's end): the rows of a sweep run
here, arriving as points finish; a killed worker's point run again, one failing twice kept as a
row with its error; an interrupt that leaves no worker behind, and resume= that runs only the
missing points. Every test ends with no sweep worker left on the cluster."""

from __future__ import annotations

import _thread
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

import labkit
from labkit.lab import sweeps

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

TINY = dict(input_lens=[8], num_iters=2, num_iters_warmup=0, progress=False, dtype="float32")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for the module (a sweep's cluster="local" uses the one running)."""
    was_up = ray.is_initialized()
    if not was_up:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if not was_up:
        ray.shutdown()


def _sweep_workers() -> list[str]:
    from labkit.engine.executor.ray_actors import ACTOR_NAMESPACE

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == ACTOR_NAMESPACE and a["name"].startswith("labkit-sweep-")
    ]


def _worker_processes() -> list[psutil.Process]:
    """This process's descendants that run a sweep worker (Ray titles them ray::GroupWorker)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "GroupWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _assert_clean() -> None:
    """No sweep worker left: none named in Ray's GCS, no such process, every CPU free again."""
    assert _sweep_workers() == []
    deadline = time.monotonic() + 20
    while (
        _worker_processes()
        or ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"]
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _worker_processes() == []
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]


def _tokens(record) -> tuple[int, int, int]:
    """(prefill tokens, decode tokens, steps) of a point's step log."""
    s = record.steps
    return int(s.num_prefill_tokens.sum()), int(s.num_decode_seqs.sum()), len(s)


def test_cluster_sweep_gives_the_rows_of_a_local_one_as_they_finish(local_ray, tiny_ckpts):
    kw = dict(TINY, batch_sizes=[1, 2, 3], output_lens=[4], tensor_parallel_sizes=[1, 2])
    model = str(tiny_ckpts["llama"])
    here = labkit.sweep(model, **kw)
    arrivals = []
    there = labkit.sweep(
        model, cluster="local", on_point=lambda df: arrivals.append((time.time(), len(df))), **kw
    )
    assert list(there.df.columns) == list(here.df.columns) == sweeps.COLUMNS
    keys = ["tensor_parallel_size", "batch_size", "input_len", "output_len"]
    mine = {
        tuple(r[k] for k in keys): rec for r, rec in zip(here.df.to_dict("records"), here.records)
    }
    theirs = {
        tuple(r[k] for k in keys): rec for r, rec in zip(there.df.to_dict("records"), there.records)
    }
    assert len(there.df) == 6 and mine.keys() == theirs.keys()
    for point, rec in theirs.items():
        assert _tokens(rec) == _tokens(mine[point]), point
        assert rec.row["num_iters"] == 2 and rec.row["avg_latency_s"] > 0
    assert (there.df.error == "").all()
    assert (there.df.node == socket.gethostname()).all() and (there.df.device == "cpu").all()
    assert (here.df.node == socket.gethostname()).all() and (here.df.device == "cpu").all()
    # Streamed one by one: the first row was kept before the last point had started.
    assert [n for _, n in arrivals] == [1, 2, 3, 4, 5, 6]
    last = there.records[-1].steps.start_time.min()
    assert arrivals[0][0] < last, (arrivals, last)
    nodes = there.meta["cluster"]["nodes"]
    assert list(nodes) == [socket.gethostname()] and nodes[socket.gethostname()]["ceilings"]
    assert not there.interrupted
    _assert_clean()


def test_a_killed_workers_point_runs_again_and_twice_is_a_row(local_ray, tiny_ckpts, tmp_path):
    started = []

    def on_start(point):
        # Kill the worker as its point starts: batch 2 once (run again, measured), batch 3 on
        # both its attempts (kept as a row with the error).
        started.append(point.batch_size)
        if point.batch_size == 3 or started.count(2) == 1 and point.batch_size == 2:
            for p in _worker_processes():
                os.kill(p.pid, signal.SIGKILL)

    path = tmp_path / "s.jsonl"
    # 64 output tokens: the point still runs when the kill lands.
    r = labkit.sweep(
        str(tiny_ckpts["llama"]),
        cluster="local",
        batch_sizes=[1, 2, 3],
        output_lens=[64],
        on_start=on_start,
        output=path,
        **TINY,
    )
    assert started == [1, 2, 2, 3, 3]
    assert list(r.df.batch_size) == [1, 2, 3] and not r.interrupted
    assert list(r.df.error.iloc[:2]) == ["", ""] and (r.df.avg_latency_s.iloc[:2] > 0).all()
    failed = r.df.iloc[2]
    assert "Actor" in failed.error and failed.num_iters == 0, failed.error
    assert failed.avg_latency_s != failed.avg_latency_s  # NaN: nothing measured
    _assert_clean()
    # The file has the failed row; resume= runs that point again (here, in this process) and
    # the file keeps the point once.
    assert labkit.load_sweep(path).df.error.iloc[2] == failed.error
    again = []
    resumed = labkit.sweep(
        str(tiny_ckpts["llama"]),
        batch_sizes=[1, 2, 3],
        output_lens=[64],
        resume=path,
        on_start=again.append,
        **TINY,
    )
    assert [p.batch_size for p in again] == [3]
    reloaded = labkit.load_sweep(path)
    assert sorted(reloaded.df.batch_size) == [1, 2, 3] and (reloaded.df.error == "").all()
    assert reloaded.df.equals(resumed.df)


def test_interrupted_cluster_sweep_leaves_no_worker_and_resumes(local_ray, tiny_ckpts, tmp_path):
    model, path = str(tiny_ckpts["llama"]), tmp_path / "s.jsonl"
    kw = dict(TINY, batch_sizes=[1, 2, 3, 4], output_lens=[32], cluster="local")
    timers = []

    def on_point(df):
        # After the second point, Ctrl-C from another thread while the third one runs.
        if len(df) == 2:
            timers.append(threading.Timer(0.05, _thread.interrupt_main))
            timers[-1].start()

    r = labkit.sweep(model, on_point=on_point, output=path, **kw)
    assert r.interrupted and list(r.df.batch_size) == [1, 2]
    assert labkit.last_sweep() is r
    _assert_clean()
    started = []
    resumed = labkit.sweep(model, resume=path, on_start=started.append, **kw)
    assert [p.batch_size for p in started] == [3, 4]
    assert list(resumed.df.batch_size) == [1, 2, 3, 4] and not resumed.interrupted
    assert labkit.load_sweep(path).df.equals(resumed.df)
    _assert_clean()


def test_the_cluster_module_imports_ray_only_when_a_sweep_asks():
    code = (
        "import sys, labkit, labkit.lab.sweeps, labkit.lab.cluster\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_cli_sweep_joins_a_running_cluster_by_its_address(local_ray, tiny_ckpts, tmp_path):
    # `labkit sweep --cluster ADDRESS` in another process joins this module's Ray.
    address = ray.get_runtime_context().gcs_address
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
        "--input-lens",
        "8",
        "--output-lens",
        "4",
        "--num-iters",
        "1",
        "--num-iters-warmup",
        "0",
        "--output-dir",
        str(out),
        "--cluster",
        address,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    df = labkit.load_sweep(out / "sweep.jsonl").df
    assert list(df.batch_size) == [1, 2] and (df.error == "").all()
    assert (df.node == socket.gethostname()).all() and "node" in done.stdout
    _assert_clean()


def test_a_group_no_node_can_hold_is_rows_with_that_error(local_ray, tiny_ckpts, tmp_path):
    # TP 4 needs 4 CPUs on one node; this cluster has 2: rows with the error, nothing waits.
    # (A copy whose config allows TP 4: 4 KV heads. Its weights never load.)
    import json
    import shutil

    model = shutil.copytree(tiny_ckpts["llama"], tmp_path / "ckpt")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    r = labkit.sweep(
        str(model),
        cluster="local",
        batch_sizes=[1, 2],
        output_lens=[4],
        tensor_parallel_sizes=[4],
        **TINY,
    )
    assert list(r.df.batch_size) == [1, 2] and not r.interrupted
    assert r.df.error.str.contains("no node of the Ray cluster has 4 CPUs").all()
    _assert_clean()


def test_dashboard_sweeps_on_the_cluster(local_ray, tiny_ckpts, tmp_path):
    # The dashboard's sweep runs on a thread: rows reach its progress bar and charts.
    d = labkit.dashboard(
        str(tiny_ckpts["llama"]),
        batch_sizes=[1, 2],
        input_lens=[8],
        output_lens=[3],
        export_dir=tmp_path,
        cluster="local",
        dtype="float32",
    )
    d.run_button.click()
    d.wait(300)
    assert len(d.result.df) == 2 and d.progress.value == 2, d.status.value
    assert (d.result.df.error == "").all() and "cluster" in d.result.meta
    assert all([len(t.x) for t in c.widget.data] == [2] for c in d.charts.values())
    _assert_clean()


def test_a_local_ray_is_not_started_from_a_thread():
    # Its processes would die with the thread (Linux's parent-death signal): a clear error.
    code = (
        "import threading\nfrom labkit.lab.cluster import connect\nout = []\n"
        "def go():\n    try:\n        connect('local')\n    except RuntimeError as e:\n"
        "        out.append(str(e))\n"
        "t = threading.Thread(target=go); t.start(); t.join()\n"
        "import ray\nassert not ray.is_initialized() and 'main thread' in out[0], out\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
