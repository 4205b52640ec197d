"""FP8 matmuls on a lent GPU: labkit's FP8 decode kernel and the _scaled_mm path checked against
the dequantizing reference at Qwen2.5-7B-Instruct's shapes, and timed against bf16 (labkit's
gemv where its table picks it, cuBLAS otherwise) and plain cuBLAS; --tune fills the card's table
with FP8 decode-kernel entries.

  python dev/gpu_fp8.py --out DIR [--tune [--install] [--shapes down_proj,...]]

Shapes: qkv (3584 -> 4608, with its bias), o (3584 -> 3584), gate/up (3584 -> 37888), down
(18944 -> 3584, after silu_and_mul as the FP8 layers run it). Weights are quantized per output row
(what `quantization="fp8"` does at load), inputs per token; the block-scaled scheme (128x128
weight blocks, 128-column input groups) is checked too and timed at one row. Timings are CUDA
graphs of back-to-back calls cycling through weight copies larger than the L2 (gpu_gemv.graph_us),
so each call reads its weight from memory, as in a decode step; prefill rows are timed the same
way. Writes DIR/gpu_fp8.json; --tune also DIR/gemv_<card>.json (the installed table with its
"fp8,..." entries replaced; --install copies it into kernels/configs/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_gemv import L2_BYTES, REPO, copy_bandwidth, graph_us, kernel_args, model_shapes

sys.path.insert(0, str(REPO))

from labkit.kernels.gemv import gemv  # noqa: E402
from labkit.kernels.gemv_configs import (  # noqa: E402
    FMA_MAX_ROWS,
    GemvConfig,
    choose_config,
    config_path,
    fp8_heuristic_config,
    table_key,
)
from labkit.kernels.gemv_tiles import Fp8Operands  # noqa: E402
from labkit.layers.quantization.fp8 import fp8_linear, quantize, quantize_per_channel  # noqa: E402
from labkit.layers.quantization.fp8_cuda import quantize_input, scaled_mm_linear  # noqa: E402

DECODE_ROWS = (1, 2, 4, 8, 16)
PREFILL_ROWS = 2048
TUNE_FMA = [
    GemvConfig(bn, bk, nw, False, sk, fuse_act=False)
    for bn, bk, nw, sk in (
        (4, 1024, 2, 1),
        (4, 1024, 4, 1),
        (8, 1024, 4, 1),
        (4, 2048, 4, 1),
        (16, 512, 4, 1),
        (8, 1024, 4, 2),
        (4, 2048, 4, 2),
        (8, 1024, 4, 4),
        # larger tiles: at one byte a weight a tile carries half a bf16 tile's bytes, and the
        # first tune picked the largest tiles above at 1 row for every shape
        (32, 512, 8, 1),
        (16, 1024, 4, 1),
        (16, 1024, 8, 1),
        (8, 2048, 4, 1),
        (8, 2048, 8, 1),
        (4, 4096, 4, 1),
    )
]
TUNE_DOT = [
    GemvConfig(bn, bk, nw, True, sk, fuse_act=False)
    for bn, bk, nw, sk in (
        (64, 256, 4, 1),
        (64, 256, 4, 2),
        (64, 256, 4, 4),
        (64, 256, 4, 8),
        (64, 128, 4, 4),
        (128, 128, 8, 1),
        (128, 256, 8, 4),
        (32, 512, 4, 4),
        # wider tiles for the FP8 tensor-core loop, which converts no weight
        (64, 512, 4, 1),
        (64, 512, 4, 2),
        (32, 256, 4, 2),
        (128, 256, 8, 1),
    )
]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def block_quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w quantized with a scale per 128x128 block (as the -FP8 checkpoints store it)."""
    n, k = w.shape
    blocks = (
        F.pad(w.float(), (0, -k % 128, 0, -n % 128)).unflatten(0, (-1, 128)).unflatten(2, (-1, 128))
    )
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    return quantize(w, full), scale


def fp8_call(x, q, scale, bias, cfg, block=None):
    """One decode-kernel call as fp8_cuda makes it: per-token inputs quantized first (that
    kernel timed with it), 128-column groups with block scales."""
    if block:
        fp8 = Fp8Operands(scale, block, "group", 128)
        return lambda: gemv(x, q, bias, config=cfg, fp8=fp8, **kernel_args())
    args = kernel_args()

    def call():
        xq, x_scale = quantize_input(x, "token", args["pdl"])
        fp8 = Fp8Operands(scale, None, "token", input_scale=x_scale, dtype=x.dtype)
        return gemv(xq, q, bias, config=cfg, fp8=fp8, **args)

    return call


def bf16_call(x, w, bias, use_gemv: bool):
    """bf16 as an engine runs it: labkit's gemv where the table (or heuristic) picks it."""
    cfg = choose_config(x.shape[0], *w.shape, x.device) if use_gemv else None
    if cfg is None:
        return lambda: F.linear(x, w, bias)
    return lambda: gemv(x, w, bias, config=cfg, **kernel_args())


def shape_rows(name, n, k, has_bias, copy_bw, tune: bool) -> list[dict]:
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda") if has_bias else None
    q, scale = quantize_per_channel(w)
    copies = max(2, -(-L2_BYTES // (n * k)))
    qs = [q] + [q.clone() for _ in range(copies - 1)]
    ws = [w] + [w.clone() for _ in range(max(2, -(-L2_BYTES // (2 * n * k))) - 1)]
    blocked = block_quantized(w)
    rows = []
    for m in (*DECODE_ROWS, PREFILL_ROWS):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        ref = fp8_linear(x, q, scale, block=None, activations="token", bias=bias)
        row = {
            "shape": name,
            "n": n,
            "k": k,
            "m": m,
            "floor_fp8_us": (n * k + 4 * n) / copy_bw * 1e6,
        }
        pdl = kernel_args()["pdl"]
        mm = [lambda qq=qq: scaled_mm_linear(x, qq, scale, "token", bias, pdl) for qq in qs]

        def scaled_mm_row(row=row, mm=mm, ref=ref):
            row["scaled_mm_err"] = rel_err(mm[0](), ref)
            row["scaled_mm_us"] = graph_us(mm * 2)

        attempt(row, "_scaled_mm", scaled_mm_row)
        attempt(
            row,
            "cuBLAS",
            lambda: row.update(
                cublas_bf16_us=graph_us([bf16_call(x, ww, bias, False) for ww in ws] * 2)
            ),
        )
        if m <= 16:
            row["labkit_bf16_us"] = graph_us([bf16_call(x, ww, bias, True) for ww in ws] * 2)
            attempt(
                row,
                "decode kernel",
                lambda: decode_row(row, x, qs, scale, bias, ref, blocked, copies),
            )
            if tune:
                row["tuned"] = tune_shape(x, qs, scale, bias, ref, m)
        rows.append(row)
        print_row(row)
    del qs, ws, blocked
    torch.cuda.empty_cache()
    return rows


def attempt(row: dict, what: str, fn) -> None:
    """fn(), an exception recorded in the row and printed instead of ending the run."""
    try:
        fn()
    except Exception as e:
        row.setdefault("errors", {})[what] = f"{type(e).__name__}: {e}"[:2000]
        print(f"  {row['shape']} M={row['m']} {what}: {type(e).__name__}: {str(e)[:300]}")


def decode_row(row, x, qs, scale, bias, ref, blocked, copies) -> None:
    """The decode kernel at x's rows with the configuration an engine would take (per-row
    scales), and with block scales (its tile widened to whole 128-column groups, as fp8_cuda
    does), checked, timed at one row."""
    m, (n, k) = x.shape[0], qs[0].shape
    cfg = choose_config(m, n, k, x.device, fp8=True)
    row["config"] = cfg and cfg.__dict__
    if cfg is not None:
        row["gemv_err"] = rel_err(fp8_call(x, qs[0], scale, bias, cfg)(), ref)
        row["gemv_us"] = graph_us([fp8_call(x, qq, scale, bias, cfg) for qq in qs] * 2)
    base = cfg or fp8_heuristic_config(m, n, k)
    cfg = dataclasses.replace(base, block_k=max(base.block_k, 128))
    qb, sb = blocked
    ref = fp8_linear(
        x, qb, sb, block=(128, 128), activations="group", activation_group=128, bias=bias
    )
    row["block_gemv_err"] = rel_err(fp8_call(x, qb, sb, bias, cfg, (128, 128))(), ref)
    if m == 1:
        qbs = [qb] + [qb.clone() for _ in range(copies - 1)]
        row["block_gemv_us"] = graph_us(
            [fp8_call(x, q, sb, bias, cfg, (128, 128)) for q in qbs] * 2
        )


def tune_shape(x, qs, scale, bias, ref, m) -> list[dict]:
    out = []
    for cfg in (TUNE_FMA if m <= FMA_MAX_ROWS else []) + TUNE_DOT:
        try:
            err = rel_err(fp8_call(x, qs[0], scale, bias, cfg)(), ref)
            us = graph_us([fp8_call(x, qq, scale, bias, cfg) for qq in qs] * 2)
        except Exception as e:  # e.g. out of registers / shared memory
            print(f"  M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        out.append(dict(cfg.__dict__, us=us, rel_err=err))
    return out


def print_row(r: dict) -> None:
    nan = float("nan")

    def f(key):
        v = r.get(key)
        return f"{v:8.1f}" if v is not None else f"{'-':>8}"

    print(
        f"{r['shape']:>13} {r['m']:>5} {r['floor_fp8_us']:8.1f} {f('gemv_us')} {f('block_gemv_us')}"
        f" {f('scaled_mm_us')} {f('labkit_bf16_us')} {f('cublas_bf16_us')}  err: gemv"
        f" {r.get('gemv_err', nan):.1e} block {r.get('block_gemv_err', nan):.1e} _scaled_mm"
        f" {r.get('scaled_mm_err', nan):.1e}",
        flush=True,
    )
    ok = [t for t in r.get("tuned", []) if t["rel_err"] < 1e-2]
    if ok:
        t = min(ok, key=lambda t: t["us"])
        print(
            f"{'':>19} tuned best {t['us']:.1f} us: {'dot' if t['dot'] else 'fma'}"
            f" {t['block_n']}x{t['block_k']} w{t['num_warps']} split-K {t['split_k']}",
            flush=True,
        )


def table_entries(rows: list[dict]) -> dict:
    """Per row bucket and shape: the fastest correct FP8 decode config if it beats _scaled_mm."""
    out = {}
    for r in rows:
        ok = [t for t in r.get("tuned", []) if t["rel_err"] < 1e-2]
        if r["m"] > 16 or "scaled_mm_us" not in r:
            continue
        best = min(ok, key=lambda t: t["us"]) if ok else None
        win = best is not None and best["us"] < r["scaled_mm_us"]
        fields = ("block_n", "block_k", "num_warps", "dot", "split_k", "fuse_act")
        out[table_key(r["m"], r["n"], r["k"], fp8=True)] = (
            {f: best[f] for f in fields} if win else None
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/fp8")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--shapes", default="qkv_proj,o_proj,gate_up_proj,down_proj")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    shapes = model_shapes(REPO / "data/configs/Qwen2.5-7B-Instruct")
    result = {"card": card, "copy_bytes_per_s": copy_bw, "command": " ".join(sys.argv), "rows": []}
    print(f"card {card}, copy {copy_bw / 1e12:.2f} TB/s; microseconds per call")
    cols = ("floor", "fp8 gemv", "block", "fp8 mm", "bf16", "cuBLAS")
    print(f"{'shape':>13} {'M':>5}" + "".join(f" {c:>8}" for c in cols))
    for name in args.shapes.split(","):
        n, k, has_bias, _ = shapes[name]
        result["rows"] += shape_rows(name, n, k, has_bias, copy_bw, args.tune)
        (out / "gpu_fp8.json").write_text(json.dumps(result, indent=1))
    errs = ("gemv_err", "block_gemv_err", "scaled_mm_err")
    bad = [r for r in result["rows"] if max(r.get(e, 0) for e in errs) > 1e-2 or "errors" in r]
    print(f"{len(bad)} rows above 1e-2 relative error or failing")
    for r in bad:
        print(f"  {r['shape']} M={r['m']}", {e: r.get(e) for e in errs}, r.get("errors", ""))
    if args.tune:
        installed = config_path(card)
        table = json.loads(installed.read_text())["configs"] if installed.exists() else {}
        table.update(table_entries(result["rows"]))
        path = out / installed.name
        path.write_text(
            json.dumps(
                {"card": card, "source": "dev/gpu_gemv.py, dev/gpu_fp8.py", "configs": table},
                indent=1,
            )
        )
        print(f"table: {path}")
        if args.install:
            installed.parent.mkdir(exist_ok=True)
            shutil.copy(path, installed)


if __name__ == "__main__":
    main()
