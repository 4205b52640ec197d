"""Derives a sweep file's rows again from what it kept (each point's step log and raw latencies)
and the ceilings it was measured under, after a change to how rows are derived; runs nothing.

    python dev/rederive_sweep.py SWEEP.jsonl [--out NEW.jsonl]    # default: in place

A GPU sweep can't be run again on a CPU machine, but its TTFT/TPOT come from its step logs, which
the file holds: labkit.lab.points.batch_times reads them again (with the run's async scheduling:
on by default on CUDA), and derive() rebuilds every row under the file's own ceilings.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkit.lab import roofline, sweep_file  # noqa: E402
from labkit.lab.points import EngineGroup, Point, batch_times, derive  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    meta, records = sweep_file.read(args.sweep)
    p = meta["params"]
    engine_args = {k: v for k, v in meta["engine_args"].items() if k != "device"}
    ran_on_cuda = meta["environment"]["device"].startswith("cuda")
    async_scheduling = engine_args.get("async_scheduling")
    async_scheduling = ran_on_cuda if async_scheduling is None else async_scheduling
    groups = {}
    for rec in records:
        point = Point.of_row(rec.row)
        tp = point.tensor_parallel_size
        if tp not in groups:
            # Resolved here (a CPU is fine: only the model's shape and dtype are read), then
            # given the run's own ceilings.
            g = EngineGroup(
                p["model"],
                tp,
                p["backend"],
                p["mode"],
                p["num_iters"],
                p["num_iters_warmup"],
                p["seed"],
                dict(engine_args, device="cpu"),
            )
            g.config = _on_cuda(g.config) if ran_on_cuda else g.config
            g.set_ceilings(roofline.Ceilings(**meta["ceilings"]))
            groups[tp] = g
        if rec.steps is None or not rec.raw:
            continue
        timed = [
            batch_times(s, async_scheduling)
            for k, s in rec.steps.groupby("iteration", sort=True)
            if k >= 0
        ]
        o = point.output_len
        rec.raw = dict(
            rec.raw,
            ttfts=[t[0] for t in timed],
            tpots=[(t[1] - t[0]) / (o - 1) if o > 1 else math.nan for t in timed],
        )
        row = derive(groups[tp], point, rec.raw)
        rec.row = {**row, **{k: rec.row[k] for k in rec.row if k not in row}}
    out = Path(args.out or args.sweep)
    sweep_file.write(out, meta, records)
    print(f"wrote {out}: {len(records)} points")


def _on_cuda(config):
    """The resolved config as the run had it: ceilings scale by TP on separate GPUs."""
    import dataclasses

    return dataclasses.replace(config, device="cuda")


if __name__ == "__main__":
    main()
