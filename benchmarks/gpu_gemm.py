"""The decode step's GEMMs on a lent GPU: cuBLAS (F.linear, as the model calls it) against
labkit_kernels.skinny_gemm's launch configurations, at the few rows of a decode step.

  python benchmarks/gpu_gemm.py [--out DIR]

Qwen2.5-7B's shapes (weights [N, K] bf16) at M = 1 and 8 rows, each timed in a CUDA graph of 20
calls (so launch gaps and cuBLAS's split-K reduce kernels count). Prints, per shape and M, the
cuBLAS time and the best skinny configurations; writes gpu_gemm.json under --out. (A first run
also compared torch.backends.cuda.preferred_blas_library "cublas" with "cublaslt": the same
nvjet kernels, times within 1 % except down_proj at M = 64; PERF_NOTES.)
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit_kernels.skinny_gemm import SkinnyConfig, skinny_gemm

SHAPES = {"qkv_proj (bias)": (4608, 3584, True), "o_proj": (3584, 3584, False),
          "down_proj": (3584, 18944, False), "gate_up_proj": (37888, 3584, False)}
ROWS = (1, 8)
CALLS = 20
BLOCK_NS = (16, 32, 64)
BLOCK_KS = (128, 256)
SPLITS = (1, 2, 4, 8)
STAGES = (3, 5)


def graph_time_us(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    rows = []
    for name, (n, k, has_bias) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        b = torch.randn(n, dtype=torch.bfloat16, device="cuda") if has_bias else None
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = F.linear(x, w, b)
            row = {"gemm": name, "n": n, "k": k, "m": m,
                   "cublas_us": graph_time_us(lambda: F.linear(x, w, b)), "skinny": []}
            for bn, bk, sp, st in itertools.product(BLOCK_NS, BLOCK_KS, SPLITS, STAGES):
                if k % (bk * sp):
                    continue
                cfg = SkinnyConfig(block_n=bn, block_k=bk, splits=sp, num_stages=st)
                try:
                    ok = torch.allclose(skinny_gemm(x, w, b, cfg).float(), ref.float(), atol=2e-2, rtol=2e-2)
                    us = graph_time_us(lambda: skinny_gemm(x, w, b, cfg))
                except Exception as e:  # e.g. shared memory for many stages of a large tile
                    print(f"{name} M={m} {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                row["skinny"].append(dict(cfg.__dict__, us=us, ok=ok))
            row["skinny"].sort(key=lambda r: r["us"])
            rows.append(row)
            best = row["skinny"][0]
            print(f"{name} M={m}: cuBLAS {row['cublas_us']:.2f} us ({n * k * 2 / row['cublas_us'] / 1e6:.2f} TB/s)"
                  f"  best skinny {best['us']:.2f} us ({n * k * 2 / best['us'] / 1e6:.2f} TB/s)", flush=True)
            for r in row["skinny"][:4]:
                print(f"   {r}", flush=True)
        del w
    bad = sum(not r["ok"] for row in rows for r in row["skinny"])
    print(f"{bad} skinny configurations off the reference")
    if args.out:
        Path(args.out, "gpu_gemm.json").write_text(json.dumps(
            {"card": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
