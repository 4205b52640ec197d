"""labkit.kernels on a GPU at Qwen2.5-7B shapes: each kernel against its torch reference, and timed.

    python dev/gpu_kernels.py        # one H100/H200 call, about a minute or two

Shapes: 28 query heads, 4 KV heads, head_dim 128, hidden 3584, intermediate 18944, bf16. For
each kernel: the max abs error against the reference on fresh random inputs, and the median time
from triton.testing.do_bench (which clears L2 before every run, so the K/V reads are cold).
Paged kernels run with KV-cache block sizes 16, 32 and 64 over shuffled (non-contiguous) blocks.
Decode reports achieved GB/s over the bytes that must be read or written (K/V of every context,
q, out) beside the device copy bandwidth measured in the same run; prefill reports TFLOP/s of the
causal attention; the elementwise kernels report GB/s and the eager torch reference's time; the
Triton attention backend's decode step is timed against the torch backend's; the attention
kernels run once more with a sliding window; fused_moe runs at Qwen3-30B-A3B's expert shapes
(128 experts, top-8, hidden 2048, expert width 768) against the MoE layer's torch loop. The table
comes last; with $OUT set the rows also go to $OUT/gpu_kernels.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkit.kernels.fused_add_rmsnorm import (  # noqa: E402
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    rmsnorm,
    rmsnorm_ref,
)
from labkit.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402
from labkit.kernels.paged_attention_decode import (  # noqa: E402
    default_num_splits,
    paged_attention_decode,
    paged_attention_decode_ref,
)
from labkit.kernels.pdl import pdl_mode  # noqa: E402
from labkit.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from labkit.kernels.rotary_store_kvcache import rotary_store_kvcache, rotary_store_kvcache_ref  # noqa: E402
from labkit.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref  # noqa: E402

H, HKV, D, HIDDEN, INTER = 28, 4, 128, 3584, 18944
DTYPE = torch.bfloat16
PAGE_SIZES = (16, 32, 64)
CONTEXTS = (1024, 8192)
BATCHES = (1, 8, 64)
TOKENS = (1, 64, 8192)  # rows for the elementwise kernels: batch-1 decode, batch-64, a prefill
# (q_lens, ctx_lens): one fresh prompt; 8 fresh prompts in one launch; a chunk after a prefix.
PREFILL_CASES = {
    "1x1024 fresh": ([1024], [1024]),
    "8x1024 fresh": ([1024] * 8, [1024] * 8),
    "512 after 7680 cached": ([512], [8192]),
}
ATTN_TOL = dict(atol=2e-2, rtol=2e-2)
ELEM_TOL = dict(atol=3e-2, rtol=1.6e-2)  # one bf16 ulp: kernels round once, torch per op
DEV = torch.device("cuda")
# Launched as the engine launches them (LABKIT_PDL as it would read it).
PDL = pdl_mode(os.environ.get("LABKIT_PDL", "1"), DEV)
ROWS: list[dict] = []


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, return_mode="median")


def add_row(
    kernel: str,
    case: str,
    block: int | None,
    out,
    ref,
    ms: float,
    gbs=None,
    tflops=None,
    torch_ms=None,
    tol=ATTN_TOL,
) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    ok = torch.allclose(out.float(), ref.float(), **tol)
    ROWS.append(
        dict(
            kernel=kernel,
            case=case,
            block_size=block,
            max_err=err,
            ok=ok,
            us=ms * 1e3,
            gbs=gbs,
            tflops=tflops,
            torch_us=None if torch_ms is None else torch_ms * 1e3,
        )
    )
    extra = "".join(
        [
            f"  {gbs:7.0f} GB/s" if gbs else "",
            f"  {tflops:6.1f} TFLOP/s" if tflops else "",
            f"  torch {torch_ms * 1e3:8.1f} us" if torch_ms else "",
        ]
    )
    print(
        f"{kernel:24s} {case:34s} bs={block or '-':>3}  err {err:.2e} {'ok ' if ok else 'BAD'}"
        f"  {ms * 1e3:9.1f} us{extra}",
        flush=True,
    )


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s of bytes read + written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6


def block_tables(num_seqs: int, ctx: int, page: int, num_blocks: int) -> torch.Tensor:
    """Each sequence gets ctx / page distinct blocks, shuffled over the whole cache."""
    need = -(-ctx // page)
    perm = torch.randperm(num_blocks, device=DEV)[: num_seqs * need]
    return perm.view(num_seqs, need).to(torch.int32)


def decode_section() -> None:
    for page in PAGE_SIZES:
        num_blocks = max(BATCHES) * -(-max(CONTEXTS) // page)
        k_cache = torch.randn(num_blocks * page, HKV, D, dtype=DTYPE, device=DEV)
        v_cache = torch.randn_like(k_cache)
        for ctx in CONTEXTS:
            for b in BATCHES:
                table = block_tables(b, ctx, page, num_blocks)
                lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
                q = torch.randn(b, H, D, dtype=DTYPE, device=DEV)
                args = (q, k_cache, v_cache, table, lens, D**-0.5, page)
                out = paged_attention_decode(*args, pdl=PDL)
                ms = bench(lambda: paged_attention_decode(*args, pdl=PDL))
                nbytes = 2 * b * ctx * HKV * D * 2 + 2 * b * H * D * 2
                splits = default_num_splits(b, HKV, table.shape[1] * page, DEV)
                add_row(
                    "paged_attention_decode",
                    f"B={b} ctx={ctx} splits={splits}",
                    page,
                    out,
                    paged_attention_decode_ref(*args),
                    ms,
                    gbs=nbytes / ms / 1e6,
                )
        if page == PAGE_SIZES[0]:  # how the split count trades off, to check the heuristic
            for b in BATCHES[:2]:
                ctx = max(CONTEXTS)
                table = block_tables(b, ctx, page, num_blocks)
                lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
                q = torch.randn(b, H, D, dtype=DTYPE, device=DEV)
                args = (q, k_cache, v_cache, table, lens, D**-0.5, page)
                ref = paged_attention_decode_ref(*args)
                for splits in (1, 4, 16, 32):  # MAX_SPLITS is 32
                    out = paged_attention_decode(*args, num_splits=splits, pdl=PDL)
                    ms = bench(lambda: paged_attention_decode(*args, num_splits=splits, pdl=PDL))
                    nbytes = 2 * b * ctx * HKV * D * 2 + 2 * b * H * D * 2
                    add_row(
                        "decode split sweep",
                        f"B={b} ctx={ctx} splits={splits}",
                        page,
                        out,
                        ref,
                        ms,
                        gbs=nbytes / ms / 1e6,
                    )
        del k_cache, v_cache
        torch.cuda.empty_cache()


def prefill_section() -> None:
    for page in PAGE_SIZES:
        for name, (q_lens, ctx_lens) in PREFILL_CASES.items():
            num_blocks = len(ctx_lens) * -(-max(ctx_lens) // page)
            k_cache = torch.randn(num_blocks * page, HKV, D, dtype=DTYPE, device=DEV)
            v_cache = torch.randn_like(k_cache)
            table = block_tables(len(ctx_lens), max(ctx_lens), page, num_blocks)
            q = torch.randn(sum(q_lens), H, D, dtype=DTYPE, device=DEV)
            cu = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
            lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
            args = (q, k_cache, v_cache, cu, lens, table, D**-0.5, page)
            out = prefill_attention(*args, max(q_lens), pdl=PDL)
            ms = bench(lambda: prefill_attention(*args, max(q_lens), pdl=PDL))
            # QK^T and PV over the visible (causal) keys: 4 * D flops per query-key pair per head.
            pairs = sum(ql * (c - ql) + ql * (ql + 1) // 2 for ql, c in zip(q_lens, ctx_lens))
            add_row(
                "prefill_attention",
                name,
                page,
                out,
                prefill_attention_ref(*args),
                ms,
                tflops=4 * D * H * pairs / ms / 1e9,
            )


def rope_tables(max_pos: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, D, 2, device=DEV).float() / D)
    freqs = torch.outer(torch.arange(max_pos, device=DEV, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def rotary_store_section() -> None:
    cos, sin = rope_tables()
    for t in TOKENS:
        k_cache = torch.zeros(16384 * 16, HKV, D, dtype=DTYPE, device=DEV)
        v_cache = torch.zeros_like(k_cache)
        qkv = torch.randn(t, (H + 2 * HKV) * D, dtype=DTYPE, device=DEV).view(t, H + 2 * HKV, D)
        ref_qkv = qkv.clone()
        pos = torch.randint(0, cos.shape[0], (t,), device=DEV)
        slots = torch.randperm(k_cache.shape[0], device=DEV)[:t]
        ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        rotary_store_kvcache_ref(
            pos, *ref_qkv.split([H, HKV, HKV], 1), cos, sin, ref_k, ref_v, slots
        )
        args = (pos, *qkv.split([H, HKV, HKV], 1), cos, sin, k_cache, v_cache, slots)
        rotary_store_kvcache(*args, pdl=PDL)
        out = torch.cat([qkv[:, :H].flatten(), k_cache.flatten(), v_cache.flatten()])
        ref = torch.cat([ref_qkv[:, :H].flatten(), ref_k.flatten(), ref_v.flatten()])
        ms = bench(lambda: rotary_store_kvcache(*args, pdl=PDL))  # q rotating again and again
        ref_args = (pos, *ref_qkv.split([H, HKV, HKV], 1), cos, sin, ref_k, ref_v, slots)
        add_row(
            "rotary_store_kvcache",
            f"T={t}",
            None,
            out,
            ref,
            ms,
            gbs=t * (2 * H + 4 * HKV) * D * 2 / ms / 1e6,
            torch_ms=bench(lambda: rotary_store_kvcache_ref(*ref_args)),
            tol=ELEM_TOL,
        )


def elementwise_section() -> None:
    for t in TOKENS:
        x = torch.randn(t, HIDDEN, dtype=DTYPE, device=DEV)
        res = torch.randn_like(x)
        w = torch.rand(HIDDEN, dtype=DTYPE, device=DEV) + 0.5
        out, new_res = fused_add_rmsnorm(x, res, w, 1e-6, PDL)
        ref, ref_res = fused_add_rmsnorm_ref(x, res, w, 1e-6)
        if not torch.equal(new_res, ref_res):
            print(f"fused_add_rmsnorm T={t}: residual sum differs from torch's (should be exact)")
        ms = bench(lambda: fused_add_rmsnorm(x, res, w, 1e-6, PDL))
        add_row(
            "fused_add_rmsnorm",
            f"T={t}",
            None,
            out,
            ref,
            ms,
            gbs=4 * x.numel() * 2 / ms / 1e6,
            torch_ms=bench(lambda: fused_add_rmsnorm_ref(x, res, w, 1e-6)),
            tol=ELEM_TOL,
        )
        ms = bench(lambda: rmsnorm(x, w, 1e-6, PDL))
        add_row(
            "rmsnorm",
            f"T={t}",
            None,
            rmsnorm(x, w, 1e-6),
            rmsnorm_ref(x, w, 1e-6),
            ms,
            gbs=2 * x.numel() * 2 / ms / 1e6,
            torch_ms=bench(lambda: rmsnorm_ref(x, w, 1e-6)),
            tol=ELEM_TOL,
        )

    for t in TOKENS:
        x = torch.randn(t, 2 * INTER, dtype=DTYPE, device=DEV)
        ms = bench(lambda: silu_and_mul(x, PDL))
        add_row(
            "silu_and_mul",
            f"T={t}",
            None,
            silu_and_mul(x),
            silu_and_mul_ref(x),
            ms,
            gbs=3 * t * INTER * 2 / ms / 1e6,
            torch_ms=bench(lambda: silu_and_mul_ref(x)),
            tol=ELEM_TOL,
        )


MOE_E, MOE_K, MOE_H, MOE_I = 128, 8, 2048, 768
MOE_TOKENS = (1, 16, 512, 4096)
WINDOW = 4096


def window_section() -> None:
    """The attention kernels with a sliding window shorter than the context (KV block 16)."""
    page, ctx, b = 16, 8192, 8
    num_blocks = b * ctx // page
    k_cache = torch.randn(num_blocks * page, HKV, D, dtype=DTYPE, device=DEV)
    v_cache = torch.randn_like(k_cache)
    table = block_tables(b, ctx, page, num_blocks)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(b, H, D, dtype=DTYPE, device=DEV)
    args = (q, k_cache, v_cache, table, lens, D**-0.5, page)
    ms = bench(lambda: paged_attention_decode(*args, window=WINDOW, pdl=PDL))
    add_row(
        "paged_attention_decode",
        f"B={b} ctx={ctx} window={WINDOW}",
        None,
        paged_attention_decode(*args, window=WINDOW),
        paged_attention_decode_ref(*args, window=WINDOW),
        ms,
    )
    q_len = 1024
    q = torch.randn(q_len, H, D, dtype=DTYPE, device=DEV)
    cu = torch.tensor([0, q_len], dtype=torch.int32, device=DEV)
    args = (q, k_cache, v_cache, cu, lens[:1], table[:1], D**-0.5, page)
    ms = bench(lambda: prefill_attention(*args, q_len, pdl=PDL, window=WINDOW))
    add_row(
        "prefill_attention",
        f"{q_len} after {ctx - q_len} window={WINDOW}",
        None,
        prefill_attention(*args, q_len, window=WINDOW),
        prefill_attention_ref(*args, window=WINDOW),
        ms,
    )
    del k_cache, v_cache
    torch.cuda.empty_cache()


def moe_section() -> None:
    """fused_moe against its float32 reference, timed against the MoE layer's torch loop."""
    try:
        from labkit.layers.fused_moe import experts_torch, route
    except ImportError as e:  # labkit's own dependencies missing on this machine
        print(f"fused_moe skipped: {e}")
        return
    w13 = torch.randn(MOE_E, 2 * MOE_I, MOE_H, dtype=DTYPE, device=DEV) / MOE_H**0.5
    w2 = torch.randn(MOE_E, MOE_H, MOE_I, dtype=DTYPE, device=DEV) / MOE_I**0.5
    for t in MOE_TOKENS:
        x = torch.randn(t, MOE_H, dtype=DTYPE, device=DEV)
        weights, ids = route(torch.randn(t, MOE_E, device=DEV), MOE_K, True, DTYPE)
        out = fused_moe(x, w13, w2, weights, ids)
        ref = fused_moe_ref(x, w13, w2, weights, ids)
        ms = bench(lambda: fused_moe(x, w13, w2, weights, ids, pdl=PDL))
        flops = 2 * t * MOE_K * 3 * MOE_H * MOE_I
        add_row(
            "fused_moe",
            f"T={t} E={MOE_E} k={MOE_K}",
            None,
            out,
            ref,
            ms,
            tflops=flops / ms / 1e9,
            torch_ms=bench(lambda: experts_torch(x, w13, w2, weights, ids)),
        )


def backend_section() -> None:
    """One decode step's attention through each backend (rotary + store + attend), KV block
    size 16."""
    try:
        from labkit.layers.attention import SeqSlice
        from labkit.layers.attention.torch_backend import TorchAttentionBackend
        from labkit.layers.attention.triton_backend import TritonAttentionBackend
        from labkit.layers.rotary import RotaryEmbedding
        from labkit.layers.switches import KernelSwitches
    except ImportError as e:  # labkit's own dependencies missing on this machine
        print(f"backends skipped: {e}")
        return
    page = 16
    rotary = RotaryEmbedding(D, max(CONTEXTS), 1e6).to(DEV)
    for ctx in CONTEXTS:
        for b in BATCHES:
            num_blocks = b * -(-ctx // page)
            k_cache = torch.randn(num_blocks * page, HKV, D, dtype=DTYPE, device=DEV)
            v_cache = torch.randn_like(k_cache)
            table = block_tables(b, ctx, page, num_blocks).tolist()
            seqs = [SeqSlice(1, ctx, row) for row in table]
            q = torch.randn(b, H, D, dtype=DTYPE, device=DEV)
            k = torch.randn(b, HKV, D, dtype=DTYPE, device=DEV)
            v = torch.randn_like(k)
            pos = torch.full((b,), ctx - 1, device=DEV)
            torch_be = TorchAttentionBackend(page, DEV)
            triton_be = TritonAttentionBackend(page, DEV, KernelSwitches(pdl=PDL))
            m_torch, m_triton = torch_be.prepare(seqs), triton_be.prepare(seqs)
            caches, scale = (k_cache, v_cache), D**-0.5
            ref = torch_be.forward(pos, q, k, v, rotary, *caches, m_torch, scale)
            out = triton_be.forward(pos, q.clone(), k, v, rotary, *caches, m_triton, scale)
            # (q rotates in place again on every timed call: the same work)
            ms = bench(lambda: triton_be.forward(pos, q, k, v, rotary, *caches, m_triton, scale))
            torch_ms = bench(
                lambda: torch_be.forward(pos, q, k, v, rotary, *caches, m_torch, scale)
            )
            nbytes = 2 * b * ctx * HKV * D * 2 + 2 * b * H * D * 2
            add_row(
                "TritonAttentionBackend",
                f"decode B={b} ctx={ctx}",
                page,
                out,
                ref,
                ms,
                gbs=nbytes / ms / 1e6,
                torch_ms=torch_ms,
            )
            del k_cache, v_cache, caches
    torch.cuda.empty_cache()


def cell(r: dict, copy_gbs: float) -> str:
    text = f"{r['us']:.1f} us"
    if r["gbs"]:
        text += f", {r['gbs']:.0f} GB/s ({100 * r['gbs'] / copy_gbs:.0f}%)"
    if r["tflops"]:
        text += f", {r['tflops']:.0f} TFLOP/s"
    if r["torch_us"]:
        text += f"; torch {r['torch_us']:.1f} us"
    return text + ("" if r["ok"] else " BAD")


def print_summary(name: str, copy_gbs: float) -> None:
    """The paged kernels pivoted by KV block size, then the rest (the split sweep stays above)."""
    print(f"\n{name}; device copy {copy_gbs:.0f} GB/s; (%) = achieved / copy bandwidth")
    paged: dict[tuple[str, str], dict[int, dict]] = {}
    for r in ROWS:
        if r["block_size"] and r["kernel"] != "decode split sweep":
            paged.setdefault((r["kernel"], r["case"]), {})[r["block_size"]] = r
    print("| kernel | case | " + " | ".join(f"KV block {p}" for p in PAGE_SIZES) + " |")
    print("|---|---|" + "---|" * len(PAGE_SIZES))
    for (kernel, case), by_page in paged.items():
        cells = [cell(by_page[p], copy_gbs) if p in by_page else "" for p in PAGE_SIZES]
        print(f"| {kernel} | {case} | " + " | ".join(cells) + " |")
    print("\n| kernel | case | time |\n|---|---|---|")
    for r in ROWS:
        if not r["block_size"]:
            print(f"| {r['kernel']} | {r['case']} | {cell(r, copy_gbs)} |")


def main() -> None:
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    copy_gbs = copy_bandwidth()
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + written)", flush=True)
    decode_section()
    prefill_section()
    rotary_store_section()
    elementwise_section()
    backend_section()
    window_section()
    moe_section()

    print_summary(name, copy_gbs)
    bad = [r for r in ROWS if not r["ok"]]
    print(f"\n{len(ROWS) - len(bad)}/{len(ROWS)} within tolerance")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_kernels.json"
        path.write_text(
            json.dumps(
                dict(
                    device=name,
                    torch=torch.__version__,
                    triton=triton.__version__,
                    copy_gbs=copy_gbs,
                    rows=ROWS,
                ),
                indent=1,
            )
        )
        print(f"wrote {path}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
