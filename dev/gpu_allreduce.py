"""Tensor-parallel all-reduce on a lent multi-GPU machine: labkit's one-shot peer-memory kernel
(PeerAllReduce) against NCCL, for the message sizes of decode steps.

Checks the kernel's result bit for bit against the float32 rank-order sum (also over 1,000 calls
in a row with changing sizes, to catch a race between calls), then times both, eager and
replayed from a CUDA graph. Run on the device (NCCL_NVLS_ENABLE=0):

  python dev/gpu_allreduce.py --world 2,4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN = 3584  # Qwen2.5-7B
ROWS = (1, 8, 64, 256)  # decode batch sizes


def inputs(world: int, numel: int, call: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(call)
    return [torch.randn(numel, generator=g).to(torch.bfloat16) for _ in range(world)]


def time_us(fn, device, iters: int = 200, graph: bool = False) -> float:
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(50):
                fn()
        run, per = g.replay, 50
    else:
        run, per = fn, 1
    for _ in range(3):
        run()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = max(1, iters // per)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1e3 / (reps * per)


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    from labkit.distributed import TPGroup
    from labkit.kernels.one_shot_all_reduce import one_shot_all_reduce_ref
    from labkit.layers.switches import KernelSwitches

    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    group = TPGroup.create(
        rank, world, "127.0.0.1", port, device, pdl=KernelSwitches.from_env(device).pdl
    )
    result = {"world": world, "peer_all_reduce": group.peer is not None, "sizes": []}
    assert group.peer is not None, "peer access not available"
    # Correctness: every size once, then a long run of calls with changing sizes.
    mismatches, call = 0, 0
    for i in range(1000):
        rows = ROWS[i % len(ROWS)]
        xs = inputs(world, rows * HIDDEN, call)
        x = xs[rank].to(device)
        group.all_reduce(x)
        mismatches += int(not torch.equal(x.cpu(), one_shot_all_reduce_ref(xs)))
        call += 1
    result["calls_checked"], result["mismatches"] = call, mismatches
    for rows in ROWS:
        x = torch.randn(rows * HIDDEN, device=device).to(torch.bfloat16)
        nccl = lambda: group.pg.allreduce([x]).wait()  # noqa: E731
        peer = lambda: group.peer(x)  # noqa: E731
        row = {"rows": rows, "bytes": x.numel() * 2}
        for name, fn in (("nccl", nccl), ("peer", peer)):
            row[f"{name}_eager_us"] = time_us(fn, device)
            row[f"{name}_graph_us"] = time_us(fn, device, graph=True)
        result["sizes"].append(row)
    torch.cuda.synchronize(device)
    group.close()
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="2")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from labkit.utils import free_port

    summary = []
    for world in (int(w) for w in args.world.split(",")):
        if world > torch.cuda.device_count():
            print(f"world {world}: only {torch.cuda.device_count()} GPUs, skipped")
            continue
        path = os.path.join(args.out, f"allreduce_w{world}.json")
        mp.spawn(rank_main, args=(world, free_port(), path), nprocs=world)
        summary.append(json.loads(Path(path).read_text()))
    card = torch.cuda.get_device_name(0)
    print(f"\n{card}: all-reduce of rows x {HIDDEN} bf16, microseconds per call")
    print(
        "| world | rows | bytes | NCCL eager | NCCL graph | peer eager | peer graph "
        "| checked (mismatches) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in summary:
        for s in r["sizes"]:
            print(
                f"| {r['world']} | {s['rows']} | {s['bytes']} | {s['nccl_eager_us']:.1f} | "
                f"{s['nccl_graph_us']:.1f} | {s['peer_eager_us']:.1f} | {s['peer_graph_us']:.1f} | "
                f"{r['calls_checked']} ({r['mismatches']}) |"
            )


if __name__ == "__main__":
    main()
