"""The decode step's GEMMs on a lent GPU, in the two orientations cuBLAS can be asked for:
F.linear (y = x W^T, as the model calls it) and torch.mm(W, x^T) (y^T, the weight as the left
operand: on the CPU that orientation read the LM head 1.4-2.9x faster, PERF_NOTES).

  python dev/gpu_gemm.py [--out DIR]

Qwen2.5-7B's shapes (weights [N, K] bf16) at M = 1, 8 and 64 rows, each timed in a CUDA graph of
20 calls (so launch gaps and cuBLAS's split-K reduce kernels count). Prints one table; writes
gpu_gemm.json under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {
    "qkv_proj": (4608, 3584),
    "o_proj": (3584, 3584),
    "gate_up_proj": (37888, 3584),
    "down_proj": (3584, 18944),
    "lm_head": (152064, 3584),
}
ROWS = (1, 8, 64)
CALLS = 20


def graph_time_us(fn) -> float:
    """Median microseconds per call of `fn`, replayed 20 times in a row from one CUDA graph."""
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
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            assert torch.allclose(
                torch.mm(w, x.t()).t().float(), F.linear(x, w).float(), atol=2e-2, rtol=2e-2
            )
            row = {
                "gemm": name,
                "n": n,
                "k": k,
                "m": m,
                "x_wt_us": graph_time_us(lambda: F.linear(x, w)),
                "w_xt_us": graph_time_us(lambda: torch.mm(w, x.t())),
                "w_xt_contiguous_us": graph_time_us(lambda: torch.mm(w, x.t()).t().contiguous()),
            }
            rows.append(row)
            print(row, flush=True)
        del w
    print("\n| GEMM [N x K] | M | x W^T us (TB/s) | W x^T us (TB/s) | W x^T + copy us |")
    print("|---|---|---|---|---|")
    for r in rows:
        gb = r["n"] * r["k"] * 2 / 1e6
        print(
            f"| {r['gemm']} [{r['n']} x {r['k']}] | {r['m']} | {r['x_wt_us']:.1f} "
            f"({gb / r['x_wt_us']:.2f}) | {r['w_xt_us']:.1f} ({gb / r['w_xt_us']:.2f}) | "
            f"{r['w_xt_contiguous_us']:.1f} |"
        )
    if args.out:
        Path(args.out, "gpu_gemm.json").write_text(
            json.dumps({"card": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
