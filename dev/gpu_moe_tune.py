"""Fills the fused MoE kernel's per-card table (kernels/configs/fused_moe_<card>.json) for the
Qwen3-30B-A3B expert shape (128 experts, top-8, hidden 2048, expert width 768), the way
dev/gpu_gemv.py fills the decode matmul's.

    python dev/gpu_moe_tune.py [--out DIR]    # one GPU call, a few minutes

For each token count, every candidate configuration (per-slot reads for decode-sized batches,
sorted grouped GEMMs of several tile shapes for all) runs the whole fused_moe (both GEMMs, the
sorting and the SiLU-and-mul) from a CUDA graph, as a decode step replays it, over four copies of
the weights in turn so the routed experts come from memory, not from the L2. The fastest per row
bucket goes into the table; every timing, the floor (the distinct routed experts' bytes at the
copy bandwidth measured here) and the untuned default's time go to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkit.kernels import fused_moe as M  # noqa: E402
from labkit.layers.fused_moe import route  # noqa: E402

E, TOP_K, H, I = 128, 8, 2048, 768
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
COPIES = 4
PER_SLOT = [
    M.MoeConfig(1, n, k, 1, w, s, per_slot=True)
    for n in (16, 32, 64)
    for k in (128, 256)
    for w in (2, 4)
    for s in (2, 3)
]
GROUPED = [
    M.MoeConfig(*c)
    for c in [
        (16, 64, 64, 1, 4, 3),
        (16, 64, 128, 1, 4, 3),
        (16, 128, 64, 1, 4, 3),
        (16, 32, 128, 1, 4, 4),
        (16, 128, 128, 1, 8, 3),
        (32, 64, 64, 8, 4, 3),
        (32, 128, 64, 8, 4, 3),
        (64, 64, 64, 8, 4, 3),
        (64, 128, 64, 8, 4, 4),
        (64, 128, 64, 8, 8, 3),
        (64, 64, 128, 8, 4, 3),
        (64, 256, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 3),
        (128, 64, 64, 8, 4, 4),
        (128, 128, 32, 8, 8, 4),
    ]
]


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    torch.manual_seed(0)
    dt = torch.bfloat16
    layers = [
        (
            torch.randn(E, 2 * I, H, dtype=dt, device="cuda") / H**0.5,
            torch.randn(E, H, I, dtype=dt, device="cuda") / I**0.5,
        )
        for _ in range(COPIES)
    ]
    expert_bytes = 3 * H * I * 2
    rows, table = [], {}
    for t in TOKENS:
        x = torch.randn(t, H, dtype=dt, device="cuda")
        weights, ids = route(torch.randn(t, E, device="cuda"), TOP_K, True, dt)
        ref = M.fused_moe_ref(x, *layers[0], weights, ids)
        distinct = ids.unique().numel()
        floor_us = distinct * expert_bytes / bw * 1e6
        m = t * TOP_K
        cands = (PER_SLOT if m <= 128 else []) + GROUPED + [None]
        timed = []
        for cfg in cands:
            try:
                got = M.fused_moe(x, *layers[0], weights, ids, config=cfg)
                err = (got.float() - ref.float()).abs().max().item()
                if err > 0.05 * ref.float().abs().max().item() + 1e-2:
                    raise ValueError(f"wrong: max abs error {err:.3g}")

                def fn(cfg=cfg):
                    for w13, w2 in layers:
                        M.fused_moe(x, w13, w2, weights, ids, config=cfg)

                us = do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3 / COPIES
            except Exception as e:  # a tile that does not fit this card: skipped, said
                timed.append({"config": cfg and asdict(cfg), "error": str(e)[:200]})
                continue
            timed.append({"config": cfg and asdict(cfg), "us": us, "default": cfg is None})
        ok = [r for r in timed if "us" in r and not r["default"]]
        best = min(ok, key=lambda r: r["us"])
        default = next(r for r in timed if r.get("default"))
        bucket = M.row_bucket(m)
        table[str(bucket)] = best["config"]
        rows.append(
            dict(
                tokens=t,
                rows=m,
                distinct_experts=distinct,
                floor_us=floor_us,
                best_us=best["us"],
                best=best["config"],
                default_us=default.get("us"),
                timed=timed,
            )
        )
        print(
            f"T={t:5d} rows={m:6d} experts={distinct:3d} floor {floor_us:8.1f} us  "
            f"best {best['us']:8.1f} us ({best['us'] / floor_us:5.2f}x)  "
            f"default {default.get('us', float('nan')):8.1f} us  {best['config']}",
            flush=True,
        )
    doc = {
        "card": card,
        "tuned_by": "python dev/gpu_moe_tune.py",
        "date": time.strftime("%Y-%m-%d"),
        "configs": {f"{E},{2 * I},{H}": table},
    }
    path = M.config_path(card)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    (out / path.name).write_text(path.read_text())
    (out / "gpu_moe_tune.json").write_text(
        json.dumps({"card": card, "copy_bytes_per_s": bw, "rows": rows}, indent=1)
    )
    print(f"wrote {path} (and under {out})")


if __name__ == "__main__":
    main()
