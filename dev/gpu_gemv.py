"""A decode step's matmuls on a lent GPU: cuBLAS (F.linear) against labkit.kernels.gemv's launch
configurations at a decode step's row counts; writes the card's configuration table.

  python dev/gpu_gemv.py --out DIR [--install] [--shapes down_proj,...] [--config DIR]

Shapes: the model's of --config (default Qwen2.5-7B-Instruct's: qkv with its bias, o, gate/up,
down with the SiLU-and-mul fused, the LM head; a mixture of experts: qkv, o, the router, the LM
head), bf16, at 1, 2, 4, 8 and 16 rows. Each timing is a CUDA graph of back-to-back calls
that cycle through copies of the weight (more bytes than the L2 holds), so every call reads its
weight from memory and follows another kernel, as in a decode step. down_proj's cuBLAS time
includes the silu_and_mul kernel in front of it (what the fused kernel replaces). Every
configuration is checked against the float32 reference before it is timed.

Then one layer chain per row count: 28 layers of [rmsnorm, qkv, o, rmsnorm, gate/up, (silu),
down] with distinct weights, all-cuBLAS against the table's choices, against the weight-read
floor at the copy bandwidth measured here.

Writes DIR/gemv_sweep.json (every timing) and DIR/gemv_<card>.json (the table: per row bucket
and shape the fastest configuration, or null where cuBLAS is faster); --install copies the table
into kernels/configs/, where the engine looks it up. --shapes sweeps only those and updates their
entries in the installed table (no layer chains then).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkit.kernels.fused_add_rmsnorm import fused_add_rmsnorm  # noqa: E402
from labkit.kernels.gemv import GemvWorkspace, gemv, gemv_ref  # noqa: E402
from labkit.kernels.gemv_configs import FMA_MAX_ROWS, GemvConfig, config_path, row_bucket  # noqa: E402
from labkit.kernels.pdl import pdl_mode  # noqa: E402
from labkit.kernels.silu_and_mul import silu_and_mul  # noqa: E402
from labkit.models.model_config import ModelConfig  # noqa: E402

ROWS = (1, 2, 4, 8, 16)
# From a first sweep on an H200 (PERF_NOTES, v6): FMAs only win at 1-2 rows, tensor cores want
# 64-row (wgmma) tiles, and weights of few rows (o_proj, down_proj) want split-K.
FMA = [
    GemvConfig(bn, bk, nw, False, sk)
    for bn, bk, nw, sk in (
        (4, 512, 2, 1),
        (4, 1024, 4, 1),
        (2, 1024, 4, 1),
        (4, 512, 2, 2),
        (4, 1024, 4, 2),
        (4, 1024, 4, 4),
        (2, 1024, 4, 2),
    )
]
DOT = [
    GemvConfig(bn, bk, nw, True, sk)
    for bn, bk, nw, sk in (
        (64, 128, 4, 1),
        (64, 128, 4, 2),
        (64, 128, 4, 4),
        (64, 128, 4, 8),
        (128, 64, 8, 1),
        (128, 64, 8, 4),
    )
]
L2_BYTES = 256 << 20  # copies of a weight add up to at least this: several times any L2


def model_shapes(config_dir: Path) -> dict[str, tuple[int, int, bool, bool]]:
    """A model's decode matmuls, name: (N, K, bias, gated); a mixture of experts has its router
    where a dense model has gate/up and down (the experts have their own kernel)."""
    cfg = ModelConfig.from_dict(json.loads((config_dir / "config.json").read_text()))
    h, d = cfg.hidden_size, cfg.head_dim
    heads = cfg.num_attention_heads
    shapes = {
        "qkv_proj": ((heads + 2 * cfg.num_key_value_heads) * d, h, cfg.attention_bias, False),
        "o_proj": (h, heads * d, False, False),
    }
    if cfg.num_experts:
        shapes["router"] = (cfg.num_experts, h, False, False)
    else:
        shapes["gate_up_proj"] = (2 * cfg.intermediate_size, h, False, False)
        shapes["down_proj"] = (h, cfg.intermediate_size, False, True)
    shapes["lm_head"] = (cfg.vocab_size, h, False, False)
    return shapes


def graph_us(fns: list, reps: int = 15) -> float:
    """Median microseconds per call of one CUDA graph replay of `fns` (each called once)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    del g
    return sorted(times)[len(times) // 2]


_workspace: GemvWorkspace | None = None


def kernel_args() -> dict:
    """The launch arguments an engine's layers pass: one split-K workspace, LABKIT_PDL's mode."""
    global _workspace
    dev = torch.device("cuda", torch.cuda.current_device())
    if _workspace is None:
        _workspace = GemvWorkspace(dev)
    return {"workspace": _workspace, "pdl": pdl_mode(os.environ.get("LABKIT_PDL", "1"), dev)}


def cublas_call(x, w, b, gated):
    pdl = kernel_args()["pdl"]
    if gated:
        return lambda: F.linear(silu_and_mul(x, pdl), w, b)
    return lambda: F.linear(x, w, b)


def call(x, w, b, gated, cfg):
    """One gemv call as labkit.layers.linear makes it (the activation first if not fused)."""
    kw = kernel_args()
    if gated and not cfg.fuse_act:
        return lambda: gemv(silu_and_mul(x, kw["pdl"]), w, b, config=cfg, **kw)
    return lambda: gemv(x, w, b, gated=gated, config=cfg, **kw)


def sweep_shape(name, n, k, has_bias, gated, copy_bw) -> list[dict]:
    copies = max(2, -(-L2_BYTES // (n * k * 2)))
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
    b = torch.randn(n, dtype=torch.bfloat16, device="cuda") if has_bias else None
    rows = []
    for m in ROWS:
        x = torch.randn(m, 2 * k if gated else k, dtype=torch.bfloat16, device="cuda")
        ref = gemv_ref(x, ws[0], b, gated=gated).float()
        row = {
            "shape": name,
            "n": n,
            "k": k,
            "m": m,
            "gated": gated,
            "floor_us": n * k * 2 / copy_bw * 1e6,
            "cublas_us": graph_us([cublas_call(x, w, b, gated) for w in ws] * 2),
            "gemv": [],
        }
        cfgs = (FMA if m <= FMA_MAX_ROWS else []) + DOT
        if gated:  # also each with silu_and_mul in front instead of fused
            cfgs += [dataclasses.replace(c, fuse_act=False) for c in cfgs]
        for cfg in cfgs:
            try:
                got = call(x, ws[0], b, gated, cfg)().float()
                err = ((got - ref).norm() / ref.norm()).item()
                us = graph_us([call(x, w, b, gated, cfg) for w in ws] * 2)
            except Exception as e:  # e.g. out of registers / shared memory
                print(f"  {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            row["gemv"].append(dict(cfg.__dict__, us=us, rel_err=err))
        ok = [r for r in row["gemv"] if r["rel_err"] < 1e-2]
        row["best"] = min(ok, key=lambda r: r["us"]) if ok else None
        best = row["best"]
        print(
            f"{name:>13} M={m:<2} floor {row['floor_us']:7.1f}  cuBLAS {row['cublas_us']:7.1f}"
            f"  gemv {best['us'] if best else float('nan'):7.1f} {best if best else ''}",
            flush=True,
        )
        rows.append(row)
    del ws
    torch.cuda.empty_cache()
    return rows


def table_from(rows: list[dict]) -> dict:
    """Per row bucket and shape: the fastest correct configuration if it beats cuBLAS."""
    out = {}
    for r in rows:
        best = r["best"]
        win = best is not None and best["us"] < r["cublas_us"]
        out[f"{row_bucket(r['m'])},{r['n']},{r['k']}"] = (
            {f: best[f] for f in ("block_n", "block_k", "num_warps", "dot", "split_k", "fuse_act")}
            if win
            else None
        )
    return out


def layer_chain(shapes, table, m, copy_bw, layers=28) -> dict:
    """A decode step's layer GEMMs with the norms between them, 28 layers of distinct weights:
    all cuBLAS (and the SiLU-and-mul kernel) against the table's choices."""
    hidden = shapes["o_proj"][0]
    ws = {
        name: [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers)]
        for name, (n, k, _, _) in shapes.items()
        if name != "lm_head"
    }
    bias = torch.randn(shapes["qkv_proj"][0], dtype=torch.bfloat16, device="cuda")
    norm_w = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(m, hidden, dtype=torch.bfloat16, device="cuda")
    res = torch.randn_like(x)

    def mm(inp, w, b=None, gated=False, use_table=True):
        cfg = table.get(f"{row_bucket(m)},{w.shape[0]},{w.shape[1]}") if use_table else None
        if cfg:
            return call(inp, w, b, gated, GemvConfig(**cfg))()
        return cublas_call(inp, w, b, gated)()

    def layer(i, use_table):
        h, _ = fused_add_rmsnorm(x, res, norm_w, 1e-6, kernel_args()["pdl"])
        qkv = mm(h, ws["qkv_proj"][i], bias, use_table=use_table)
        o = mm(
            qkv[:, :hidden], ws["o_proj"][i], use_table=use_table
        )  # stands in for attention's output
        h, _ = fused_add_rmsnorm(o, res, norm_w, 1e-6, kernel_args()["pdl"])
        gate_up = mm(h, ws["gate_up_proj"][i], use_table=use_table)
        mm(gate_up, ws["down_proj"][i], gated=True, use_table=use_table)

    nbytes = sum(w.numel() * 2 for v in ws.values() for w in v)
    out = {"m": m, "floor_us": nbytes / copy_bw * 1e6}
    for key, use in (("cublas_us", False), ("table_us", True)):
        out[key] = graph_us([lambda i=i: layer(i, use) for i in range(layers)], reps=10) * layers
    del ws
    torch.cuda.empty_cache()
    return out


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 2 GiB device-to-device copy."""
    from triton.testing import do_bench

    a = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 4 * a.numel() / (ms * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--config", default=str(REPO / "data/configs/Qwen2.5-7B-Instruct"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    shapes = model_shapes(Path(args.config))
    swept = args.shapes.split(",") if args.shapes else list(shapes)
    result = {"card": card, "copy_bytes_per_s": copy_bw, "command": " ".join(sys.argv), "rows": []}
    for name in swept:
        result["rows"] += sweep_shape(name, *shapes[name], copy_bw)
        (out / "gemv_sweep.json").write_text(json.dumps(result, indent=1))
    table = {}
    if config_path(card).exists():  # keep the entries this sweep does not time (fp8, shapes)
        table = json.loads(config_path(card).read_text())["configs"]
    table.update(table_from(result["rows"]))
    path = out / config_path(card).name
    path.write_text(
        json.dumps({"card": card, "source": "dev/gpu_gemv.py", "configs": table}, indent=1)
    )
    if args.install:
        config_path(card).parent.mkdir(exist_ok=True)
        shutil.copy(path, config_path(card))
    dense = "down_proj" in shapes
    result["chains"] = (
        [layer_chain(shapes, table, m, copy_bw) for m in (1, 8)]
        if dense and not args.shapes
        else []
    )
    (out / "gemv_sweep.json").write_text(json.dumps(result, indent=1))
    print(f"\ncard {card}, copy {copy_bw / 1e12:.2f} TB/s")
    print(f"{'shape':>13} {'M':>3} {'floor us':>9} {'cuBLAS':>8} {'gemv':>8}  best")
    for r in result["rows"]:
        best = r["best"] or {}
        how = (
            ""
            if not best
            else (
                f"{'dot' if best['dot'] else 'fma'} {best['block_n']}x{best['block_k']} "
                f"w{best['num_warps']} split-K {best['split_k']}"
                + ("" if best["fuse_act"] or not r["gated"] else ", silu first")
            )
        )
        print(
            f"{r['shape']:>13} {r['m']:>3} {r['floor_us']:9.1f} {r['cublas_us']:8.1f} "
            f"{best.get('us', float('nan')):8.1f}  {how}"
        )
    for c in result["chains"]:
        print(
            f"28-layer chain M={c['m']}: floor {c['floor_us']:.0f} us, cuBLAS {c['cublas_us']:.0f}"
            f" us, table {c['table_us']:.0f} us"
        )


if __name__ == "__main__":
    main()
