"""Decode attention's launch knobs on a lent GPU: split count x tokens per tile x warps x
pipeline stages, for the contexts of gpu_bench.py's workloads (a) and (b).

  python dev/gpu_decode_sweep.py [--out DIR]

Qwen2.5-7B's attention (28 query heads, 4 KV heads, head_dim 128), bf16, KV block size 16, block
tables of shuffled blocks. Each configuration is timed as the engine runs it: 28 layers' calls
(decode kernel + combine) replayed from one CUDA graph, so launch gaps count; us per call.
Prints the best configurations per case and the current default's time; writes
gpu_decode_sweep.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gemm import graph_time_us  # noqa: E402  (same timing as the GEMMs)

from labkit.kernels.paged_attention_decode import (  # noqa: E402
    BLOCK_N,
    default_num_splits,
    paged_attention_decode,
    paged_attention_decode_ref,
)

H, HKV, D, PAGE, LAYERS = 28, 4, 128, 16, 28
CASES = [(1, 1024), (8, 1024), (8, 1536), (8, 2048), (64, 1024)]
TABLE_WIDTH = 4096 // PAGE  # max_model_len 4096, as gpu_bench runs: the graphs' split count
SPLITS = (4, 8, 16, 32)
BLOCK_NS = (32, 64, 128)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for b, ctx in CASES:
        blocks_per_seq = ctx // PAGE
        num_blocks = b * blocks_per_seq + 1
        k_cache = torch.randn(num_blocks * PAGE, HKV, D, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn_like(k_cache)
        table = torch.zeros(b, TABLE_WIDTH, dtype=torch.int32)
        table[:, :blocks_per_seq] = (
            torch.randperm(num_blocks - 1)[: b * blocks_per_seq].view(b, -1).int()
        )
        table = table.cuda()
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(b, H, D, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        ref = paged_attention_decode_ref(q, k_cache, v_cache, table, lens, D**-0.5, PAGE)
        kv_bytes = 2 * b * ctx * HKV * D * 2
        default = default_num_splits(b, HKV, TABLE_WIDTH * PAGE, q.device)
        for splits, bn, warps, stages in itertools.product(
            sorted({default, *SPLITS}), BLOCK_NS, WARPS, STAGES
        ):
            kw = dict(num_splits=splits, out=out, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                paged_attention_decode(q, k_cache, v_cache, table, lens, D**-0.5, PAGE, **kw)
                ok = torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
                us = (
                    graph_time_us(
                        lambda: [
                            paged_attention_decode(
                                q, k_cache, v_cache, table, lens, D**-0.5, PAGE, **kw
                            )
                            for _ in range(LAYERS)
                        ]
                    )
                    / LAYERS
                )
            except Exception as e:  # e.g. out of shared memory for a large tile x many stages
                print(f"B={b} ctx={ctx} {kw}: {type(e).__name__}", flush=True)
                continue
            results.append(
                dict(
                    batch=b,
                    ctx=ctx,
                    splits=splits,
                    block_n=bn,
                    num_warps=warps,
                    num_stages=stages,
                    us=us,
                    tb_s=kv_bytes / us / 1e6,
                    ok=ok,
                    default=(splits, bn, warps, stages) == (default, BLOCK_N, 4, 2),
                )
            )
        case = sorted(
            (r for r in results if (r["batch"], r["ctx"]) == (b, ctx)), key=lambda r: r["us"]
        )
        cur = next(r for r in case if r["default"])
        print(
            f"\nB={b} ctx={ctx} ({kv_bytes / 1e6:.1f} MB of KV, floor "
            f"{kv_bytes / 4.2e6:.1f} us at 4.2 TB/s): default {cur['us']:.2f} us "
            f"(splits {cur['splits']})",
            flush=True,
        )
        for r in case[:6]:
            print(
                f"  {r['us']:6.2f} us  {r['tb_s']:.2f} TB/s  splits {r['splits']:2d} "
                f"block_n {r['block_n']:3d} "
                f"warps {r['num_warps']} stages {r['num_stages']} ok={r['ok']}",
                flush=True,
            )
        del k_cache, v_cache
    bad = [r for r in results if not r["ok"]]
    print(f"\n{len(results) - len(bad)}/{len(results)} configurations match the reference")
    if args.out:
        Path(args.out, "gpu_decode_sweep.json").write_text(
            json.dumps({"card": torch.cuda.get_device_name(), "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
