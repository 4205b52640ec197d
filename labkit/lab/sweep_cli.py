"""`labkit sweep`: labkit.sweep() from the command line.

The sweep's file (sweep.jsonl) grows a line per finished point; sweep.csv and the report
(sweep.html) are written at the end, also after Ctrl-C (the points that finished), which then
exits with 130. `--resume DIR/sweep.jsonl` runs only the points that file lacks. `--cluster
local|auto|ray://host:10001` runs the engines on a Ray cluster, side by side (labkit.lab.cluster).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from labkit.bench import throughput
from labkit.config import add_engine_args
from labkit.lab.sweeps import DEFAULTS, MODES, POINT_KEYS, sweep


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    # As sweep(): the prefix cache off unless asked for (--enable-prefix-caching).
    p.set_defaults(enable_prefix_caching=False)
    d = DEFAULTS
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes), dest="batch_sizes"
    )
    p.add_argument(
        "--input-lens", type=int, nargs="+", default=list(d.input_lens), dest="input_lens"
    )
    p.add_argument(
        "--output-lens", type=int, nargs="+", default=list(d.output_lens), dest="output_lens"
    )
    p.add_argument(
        "--tensor-parallel-sizes",
        type=int,
        nargs="+",
        default=None,
        dest="tensor_parallel_sizes",
        help="TP sizes to sweep (default: --tensor-parallel-size)",
    )
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--backend", choices=throughput.BACKENDS, default=d.backend)
    p.add_argument("--num-iters", type=int, default=d.num_iters, dest="num_iters")
    p.add_argument(
        "--num-iters-warmup", type=int, default=d.num_iters_warmup, dest="num_iters_warmup"
    )
    p.add_argument("--label", default=None)
    p.add_argument(
        "--output-dir",
        default="labkit_sweep",
        dest="output_dir",
        help="where sweep.jsonl (point by point), sweep.csv and sweep.html go",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="an earlier sweep's sweep.jsonl: run only the points it lacks",
    )
    p.add_argument(
        "--cluster",
        default=None,
        help="run on Ray: 'local' (a Ray instance on this machine's GPUs, or CPUs), "
        "'auto' (the cluster of `ray start`) or an address (ray://host:10001); "
        "each TP size's engine is one Ray actor, side by side",
    )


def main(args: argparse.Namespace, engine_kwargs: dict) -> int:
    """`labkit sweep`: `engine_kwargs` are the CLI's engine flags."""
    kwargs = dict(engine_kwargs)
    tp = kwargs.pop("tensor_parallel_size", 1)
    out = Path(args.output_dir)
    result = sweep(
        batch_sizes=args.batch_sizes,
        input_lens=args.input_lens,
        output_lens=args.output_lens,
        tensor_parallel_sizes=args.tensor_parallel_sizes or [tp],
        mode=args.mode,
        backend=args.backend,
        num_iters=args.num_iters,
        num_iters_warmup=args.num_iters_warmup,
        label=args.label,
        live=False,
        output=out / "sweep.jsonl",
        resume=args.resume,
        cluster=args.cluster,
        **kwargs,
    )
    paths = [out / "sweep.jsonl", out / "sweep.csv", result.to_html(out / "sweep.html")]
    result.df.to_csv(paths[1], index=False)
    shown = POINT_KEYS[3:] + [
        "avg_latency_s",
        "latency_std_s",
        "ttft_s",
        "tpot_s",
        "output_tok_s",
        "floor_fraction",
    ]
    if args.cluster is not None:
        shown += ["node", "device", "error"]
    with pd.option_context("display.width", 200, "display.max_columns", 15):
        print(result.df[shown])
    print("wrote " + ", ".join(map(str, paths)))
    if result.interrupted:
        print(
            f"interrupted after {len(result.df)} points: `labkit sweep ... --resume "
            f"{paths[0]}` runs the rest"
        )
        return 130
    return 0
