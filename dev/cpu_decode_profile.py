"""Where labkit's CPU time goes, per decode step (and per prefill), for the default model.

    python dev/cpu_decode_profile.py                 # batches 8 and 32
    python dev/cpu_decode_profile.py --batch-sizes 8 --skip-matmul

Four parts:
1. Engine breakdown: B prompts of --input-len random tokens go through the real engine. The
   prefill step and --steps decode steps are timed piece by piece (perf_counter wrappers around
   the model's modules, the sampler and the runner), so each piece's share of a step, and the
   Python glue left over, is measured directly. Then torch.profiler (record_shapes) runs over a
   few more decode steps and the top operators by self CPU time are listed.
2. Attention, piece by piece, on the engine's own decode metadata and KV cache (index_copy_,
   K/V gather, SDPA), with alternatives.
3. Matmul alternatives for the LM head (49152 x 576) and for the layers' projections (using the
   model's 30 real weights in turn, so the weights stream from memory as in a real step), at
   batch 1/8/32 and at prefill size.
4. Small-op costs (norm, rotary, silu) and the machine's memory bandwidth (the decode floor).

Writes dev/results/cpu_decode_profile.json (and prints everything).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_generate import CpuMeter, machine_info, make_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The clock for every timing here. With one torch thread it is the thread's CPU time, which other
# processes on a shared machine cannot inflate (they can still compete for memory bandwidth and
# cache); with more threads it must be wall time (the other threads' work is not on this clock).
CLOCK = time.perf_counter


# ---- timing helpers -----------------------------------------------------------------------
def bench(fn, reps: int = 20, warmup: int = 3) -> dict:
    """Median and min wall ms of fn() (CPU ops are synchronous)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = CLOCK()
        fn()
        ts.append((CLOCK() - t) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts)}


class Pieces:
    """Inclusive perf_counter time per label, from wrappers patched onto labkit's classes."""

    def __init__(self):
        self.ms = defaultdict(float)
        self.calls = defaultdict(int)
        self.on = False
        self._undo = []

    def wrap(self, cls, method: str, label):
        orig = getattr(cls, method)
        pieces = self

        def wrapper(self_, *a, **k):
            if not pieces.on:
                return orig(self_, *a, **k)
            name = label(self_, *a) if callable(label) else label
            t = CLOCK()
            r = orig(self_, *a, **k)
            pieces.ms[name] += (CLOCK() - t) * 1e3
            pieces.calls[name] += 1
            return r

        setattr(cls, method, wrapper)
        self._undo.append((cls, method, orig))

    def unwrap(self):
        for cls, method, orig in reversed(self._undo):
            setattr(cls, method, orig)
        self._undo.clear()

    @contextmanager
    def measuring(self):
        self.ms.clear()
        self.calls.clear()
        self.on = True
        try:
            yield self
        finally:
            self.on = False


def install_wrappers(pieces: Pieces, engine) -> None:
    from labkit.engine.model_runner import ModelRunner
    from labkit.layers.activation import SiluAndMul
    from labkit.layers.attention import Attention
    from labkit.layers.attention.torch_backend import TorchAttentionBackend
    from labkit.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from labkit.layers.linear import ColumnParallelLinear, RowParallelLinear
    from labkit.layers.norm import RMSNorm
    from labkit.layers.rotary import RotaryEmbedding

    pieces.wrap(
        ColumnParallelLinear,
        "forward",
        lambda m, *a: {
            "QKVParallelLinear": "qkv_proj",
            "MergedColumnParallelLinear": "gate_up_proj",
        }.get(type(m).__name__, "column_linear"),
    )
    pieces.wrap(
        RowParallelLinear,
        "forward",
        lambda m, *a: "o_proj" if m.weight.shape[1] == m.weight.shape[0] else "down_proj",
    )
    pieces.wrap(ParallelLMHead, "forward", "lm_head")
    pieces.wrap(VocabParallelEmbedding, "forward", "embed")
    pieces.wrap(RMSNorm, "forward", "rmsnorm")
    pieces.wrap(RotaryEmbedding, "forward", "rotary")
    pieces.wrap(Attention, "forward", "attention")
    pieces.wrap(TorchAttentionBackend, "prepare", "attn_prepare")
    pieces.wrap(SiluAndMul, "forward", "silu_mul")
    pieces.wrap(type(engine.runner.model), "forward", "model_forward")
    pieces.wrap(ModelRunner, "execute", "runner_execute")
    pieces.wrap(type(engine.sampler), "__call__", "sampler")
    pieces.wrap(type(engine), "step", "engine_step")


LAYER_PIECES = [
    "qkv_proj",
    "o_proj",
    "gate_up_proj",
    "down_proj",
    "attention",
    "rotary",
    "rmsnorm",
    "silu_mul",
    "embed",
]


def summarize(ms: dict, steps: int) -> dict:
    per = {k: v / steps for k, v in ms.items()}
    inside = sum(per.get(k, 0.0) for k in LAYER_PIECES)
    out = {k: per.get(k, 0.0) for k in LAYER_PIECES + ["lm_head", "sampler", "attn_prepare"]}
    out["layer_matmuls"] = sum(
        per.get(k, 0.0) for k in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    )
    out["model_glue"] = per.get("model_forward", 0.0) - inside  # split/view/loop in llama.py
    out["runner_other"] = (
        per.get("runner_execute", 0.0) - per.get("model_forward", 0.0) - per.get("lm_head", 0.0)
    )
    out["engine_other"] = (
        per.get("engine_step", 0.0) - per.get("runner_execute", 0.0) - per.get("sampler", 0.0)
    )
    out["step_total"] = per.get("engine_step", 0.0)
    return out


# ---- part 1: the engine -------------------------------------------------------------------
def profile_engine(llm, batch: int, input_len: int, steps: int, prof_steps: int, seed: int) -> dict:
    from labkit import SamplingParams

    engine = llm.engine
    vocab = llm.config.model_config.vocab_size
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()
    total_decode = 3 + steps + prof_steps + 2
    sp = SamplingParams(temperature=0, max_tokens=total_decode + 4, ignore_eos=True)
    for i, p in enumerate(make_prompts(batch, input_len, vocab, seed)):
        engine.add_request(f"prof{batch}-{i}", {"prompt_token_ids": p}, sp)
    pieces = Pieces()
    install_wrappers(pieces, engine)
    try:
        gc.collect()
        meter = CpuMeter()
        with pieces.measuring():
            engine.step()  # the whole batch's prefill in one step (batch * input_len tokens)
        prefill = summarize(pieces.ms, 1)
        prefill_load = meter.stop()
        for _ in range(3):  # warm decode steps
            engine.step()
        # Decode steps without wrappers, for the wrappers' own cost.
        t = CLOCK()
        for _ in range(2):
            engine.step()
        bare_ms = (CLOCK() - t) * 1e3 / 2
        meter = CpuMeter()
        with pieces.measuring():
            for _ in range(steps):
                engine.step()
        decode = summarize(pieces.ms, steps)
        decode_load = meter.stop()
        calls = {k: v // steps for k, v in pieces.calls.items()}
    finally:
        pieces.unwrap()

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(prof_steps):
            engine.step()
    ka = prof.key_averages(group_by_input_shape=True)
    top = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    total_self = sum(e.self_cpu_time_total for e in ka)
    top_ops = [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:120],
            "calls_per_step": e.count / prof_steps,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / prof_steps,
            "pct": 100 * e.self_cpu_time_total / max(total_self, 1),
        }
        for e in top
    ]
    by_name = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        by_name[e.key][0] += e.self_cpu_time_total / 1e3 / prof_steps
        by_name[e.key][1] += e.count // prof_steps
    top_names = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    n_ops = sum(e.count for e in ka if e.key.startswith("aten::")) / prof_steps

    # Capture one decode step's attention metadata for part 2.
    captured = {}
    backend = engine.runner.backend
    orig_prepare = backend.prepare

    def grab(*a, **k):
        captured["meta"] = orig_prepare(*a, **k)
        return captured["meta"]

    backend.prepare = grab  # an instance attribute over the class's method
    try:
        engine.step()
    finally:
        del backend.prepare
    while engine.has_unfinished_requests():
        engine.step()
    return {
        "batch": batch,
        "prefill_ms": prefill,
        "prefill_cpu_load": prefill_load,
        "decode_ms_per_step": decode,
        "decode_cpu_load": decode_load,
        "decode_step_ms_without_wrappers": bare_ms,
        "calls_per_decode_step": calls,
        "aten_ops_per_decode_step": n_ops,
        "top_ops_by_self_cpu": top_ops,
        "top_op_names": [
            {"op": k, "self_ms_per_step": v[0], "calls_per_step": v[1]} for k, v in top_names
        ],
        "_meta": captured.get("meta"),
    }


# ---- part 2: attention pieces ---------------------------------------------------------------
def profile_attention(llm, meta, batch: int) -> dict:
    runner = llm.engine.runner
    k_cache, v_cache = runner.kv_caches[0]
    hc = llm.config.model_config
    h, hkv, d = hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim
    n = meta.num_decode
    q = torch.randn(n, h, d)
    k = torch.randn(n, hkv, d)
    v = torch.randn(n, hkv, d)
    bs = runner.backend.block_size  # per-token slots of each context, from its block ids
    slots = (meta.decode_blocks[:, :, None] * bs + torch.arange(bs)).reshape(n, -1)
    mask = meta.decode_mask
    scale = d**-0.5
    L = slots.shape[1]
    flat = slots.reshape(-1)
    kk = k_cache[slots].transpose(1, 2)
    vv = v_cache[slots].transpose(1, 2)
    qq = q.view(n, hkv, h // hkv, d)
    res = {"batch": batch, "context_len": L}
    with torch.inference_mode():
        rotary = runner.model.model.layers[0].self_attn.attn.rotary
        positions = torch.full((n,), L - 1)
        res["backend_forward"] = bench(
            lambda: runner.backend.forward(
                positions, q, k, v, rotary, k_cache, v_cache, meta, scale
            )
        )
        res["index_copy_kv"] = bench(
            lambda: (
                k_cache.index_copy_(0, meta.slot_mapping, k),
                v_cache.index_copy_(0, meta.slot_mapping, v),
            )
        )
        res["gather_kv_advanced_index"] = bench(lambda: (k_cache[slots], v_cache[slots]))
        res["gather_kv_by_blocks (the backend's)"] = bench(
            lambda: (
                runner.backend._gather(k_cache, meta.decode_blocks),
                runner.backend._gather(v_cache, meta.decode_blocks),
            )
        )
        res["gather_kv_index_select"] = bench(
            lambda: (
                k_cache.index_select(0, flat).view(n, L, hkv, d),
                v_cache.index_select(0, flat).view(n, L, hkv, d),
            )
        )
        res["sdpa_masked"] = bench(
            lambda: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
        )
        res["sdpa_no_mask"] = bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, scale=scale))
        kkc, vvc = kk.contiguous(), vv.contiguous()
        res["sdpa_masked_contiguous_kv"] = bench(
            lambda: F.scaled_dot_product_attention(qq, kkc, vvc, attn_mask=mask, scale=scale)
        )

        def manual():
            s = torch.matmul(qq, kk.transpose(-1, -2)) * scale
            s = s.masked_fill(~mask, float("-inf"))
            return torch.matmul(s.softmax(-1), vv)

        res["manual_matmul_softmax"] = bench(manual)
        out = torch.empty_like(q)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
        res["out_copy"] = bench(lambda: out[:n].copy_(o.reshape(n, h, d)))
    return res


# ---- part 3: matmul alternatives ----------------------------------------------------------
def linear_variants(W: torch.Tensor, batch: int):
    """name -> (setup-free callable builder). Each returns fn(x) computing x @ W.T ([B, out])."""
    variants = {
        "F.linear(x, W)": lambda x: F.linear(x, W),
        "(W @ x.T).T": lambda x: (W @ x.T).T,
        "torch.mm(W, x.T).T.contiguous()": lambda x: torch.mm(W, x.T).T.contiguous(),
    }
    Wt = W.T.contiguous()
    variants["x @ W.T.contiguous() (pre-transposed)"] = lambda x: x @ Wt
    zeros = torch.zeros(W.shape[0])
    variants["torch.addmm(0, x, W.T)"] = lambda x: torch.addmm(zeros, x, W.T)
    for c in (4096, 8192):
        if W.shape[0] > c:
            chunks = list(W.split(c))
            variants[f"vocab chunks of {c} + cat"] = lambda x, chunks=chunks: torch.cat(
                [F.linear(x, w) for w in chunks], -1
            )
    if batch == 1:
        variants["torch.mv(W, x[0])"] = lambda x: torch.mv(W, x[0])[None]
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(W, batch)
        variants["mkl packed (_mkl_linear)"] = lambda x: torch.ops.mkl._mkl_linear(
            x, packed, W, None, batch
        )
    except Exception as e:  # noqa: BLE001
        print(f"  (mkl packed linear unavailable: {e})")
    try:
        Wd = W.to_mkldnn()
        variants["mkldnn_linear (mkldnn weight)"] = lambda x: torch._C._nn.mkldnn_linear(
            x.to_mkldnn(), Wd, None
        ).to_dense()
    except Exception as e:  # noqa: BLE001
        print(f"  (mkldnn_linear unavailable: {e})")
    try:
        pw = torch.ops.mkldnn._reorder_linear_weight(W, batch)
        variants["onednn prepacked (_linear_pointwise)"] = lambda x: (
            torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], "")
        )
        # One packing serves every batch size (an engine can't repack per step).
        pw32 = pw if batch == 32 else torch.ops.mkldnn._reorder_linear_weight(W, 32)
        variants["onednn prepacked for batch 32"] = lambda x: torch.ops.mkldnn._linear_pointwise(
            x, pw32, None, "none", [], ""
        )
    except Exception as e:  # noqa: BLE001
        print(f"  (onednn prepacked linear unavailable: {e})")
    return variants


def profile_lm_head(W: torch.Tensor, batches, reps: int) -> dict:
    out = {}
    for b in batches:
        x = torch.randn(b, W.shape[1])
        ref = F.linear(x, W)
        rows = {}
        for name, fn in linear_variants(W, b).items():
            try:
                y = fn(x)
                err = (y.reshape(ref.shape) - ref).abs().max().item()
                rows[name] = {**bench(lambda: fn(x), reps=reps), "max_abs_err": err}
            except Exception as e:  # noqa: BLE001
                rows[name] = {"error": str(e)[:200]}
        out[b] = rows
        best = min((r["median_ms"], n) for n, r in rows.items() if "median_ms" in r)
        print(
            f"  lm_head batch {b}: "
            + ", ".join(f"{n}={r['median_ms']:.2f}" for n, r in rows.items() if "median_ms" in r)
            + f"  -> best {best[1]} {best[0]:.2f} ms"
        )
    return out


def dense(w: torch.Tensor) -> torch.Tensor:
    """A layer's weight as a plain tensor (the engine keeps CPU weights in oneDNN's layout)."""
    return w.detach().to_dense() if w.is_mkldnn else w.detach()


def profile_layer_matmuls(model, batches, reps: int) -> dict:
    """Each projection kind over all 30 layers' weights in turn (as one decode step sees them)."""
    layers = model.model.layers
    kinds = {
        "qkv_proj": [dense(l.self_attn.qkv_proj.weight) for l in layers],
        "o_proj": [dense(l.self_attn.o_proj.weight) for l in layers],
        "gate_up_proj": [dense(l.mlp.gate_up_proj.weight) for l in layers],
        "down_proj": [dense(l.mlp.down_proj.weight) for l in layers],
    }
    out = {}
    for b in batches:
        res = {}
        for kind, ws in kinds.items():
            x = torch.randn(b, ws[0].shape[1])
            per_variant = {}
            variant_sets = [linear_variants(w, b) for w in ws]
            for name in variant_sets[0]:
                if "chunks" in name or "mv" in name:
                    continue
                fns = [vs[name] for vs in variant_sets]
                try:
                    per_variant[name] = bench(lambda: [f(x) for f in fns], reps=max(3, reps // 2))
                except Exception as e:  # noqa: BLE001
                    per_variant[name] = {"error": str(e)[:200]}
            res[kind] = per_variant
        total = defaultdict(float)
        for pv in res.values():
            for name, r in pv.items():
                if "median_ms" in r:
                    total[name] += r["median_ms"]
        res["all_4_kinds_x30_layers"] = dict(total)
        out[b] = res
        print(
            f"  layer matmuls (30 layers) batch {b}: "
            + ", ".join(f"{n}={v:.1f}" for n, v in total.items())
        )
    return out


# ---- part 4: small ops and the bandwidth floor ----------------------------------------------
def profile_small_ops(model, batches) -> dict:
    from labkit.layers.rotary import _rotate

    norm = model.model.layers[0].input_layernorm
    out = {}
    with torch.inference_mode():
        for b in batches:
            reps = 200 if b <= 32 else 10
            x = torch.randn(b, 576)
            r = torch.randn(b, 576)
            gu = torch.randn(b, 3072)
            qkv = torch.randn(b, 960)
            q, k = qkv[:, :576].view(b, 9, 64), qkv[:, 576:768].view(b, 3, 64)
            qk = qkv[:, :768].view(b, 12, 64)
            cos = torch.randn(b, 1, 64)
            sin = torch.randn(b, 1, 64)
            signed_sin = torch.cat([-sin[..., :32], sin[..., 32:]], -1)

            def rotate_addcmul(t):
                t1, t2 = t.chunk(2, dim=-1)
                return torch.addcmul(t * cos, torch.cat([t2, t1], -1), signed_sin)

            res = {
                "labkit RMSNorm(x, residual)": bench(lambda: norm(x, r), reps=reps),
                "F.rms_norm(x + residual)": bench(
                    lambda: F.rms_norm(x + r, (576,), norm.weight, norm.eps), reps=reps
                ),
                "labkit rotate(q), rotate(k)": bench(
                    lambda: (_rotate(q, cos, sin), _rotate(k, cos, sin)), reps=reps
                ),
                "rotate q|k at once, signed sin + addcmul": bench(
                    lambda: rotate_addcmul(qk), reps=reps
                ),
                "labkit silu(gate) * up": bench(
                    lambda: F.silu(gu[:, :1536]) * gu[:, 1536:], reps=reps
                ),
                "silu(gate).mul_(up)": bench(
                    lambda: F.silu(gu[:, :1536]).mul_(gu[:, 1536:]), reps=reps
                ),
                "one tiny op (x + r)": bench(lambda: x + r, reps=reps),
                "empty op (x.view(-1))": bench(lambda: x.view(-1), reps=reps),
            }
            out[b] = res
            print(
                f"  small ops batch {b}: "
                + ", ".join(f"{n}={v['median_ms'] * 1e3:.0f}us" for n, v in res.items())
            )
    return out


def bandwidth(model) -> dict:
    W = model.lm_head.weight
    big = torch.ones(64 << 20)  # 256 MiB, far past the caches
    r = bench(lambda: big.sum(), reps=10)
    gbs = big.numel() * 4 / (r["median_ms"] / 1e3) / 1e9
    lm = W.numel() * W.element_size()
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    # A decode step must read every layer weight and the LM head once: the floor at this bandwidth.
    return {
        "read_GB_s": gbs,
        "layer_weight_MB": layer_bytes / 1e6,
        "lm_head_MB": lm / 1e6,
        "decode_floor_ms": (layer_bytes + lm) / (gbs * 1e9) * 1e3,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed piece by piece")
    ap.add_argument(
        "--profile-steps", type=int, default=5, help="decode steps under torch.profiler"
    )
    ap.add_argument("--reps", type=int, default=20, help="repetitions per matmul variant")
    ap.add_argument("--skip-matmul", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; with 1, times are the thread's CPU time (robust to other "
        "processes on a shared machine)",
    )
    ap.add_argument(
        "--output-json", type=Path, default=REPO / "dev" / "results" / "cpu_decode_profile.json"
    )
    args = ap.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() == 1:
        CLOCK = time.thread_time
    print(f"torch threads: {torch.get_num_threads()}; clock: {CLOCK.__name__}", flush=True)

    from labkit import LLM

    llm = LLM(dtype="float32")
    model = llm.engine.runner.model
    report = {
        "machine": machine_info(),
        "clock": CLOCK.__name__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }

    # Warm the engine once.
    from labkit import SamplingParams

    llm.generate(
        [{"prompt_token_ids": p} for p in make_prompts(2, args.input_len, 49152, -2)],
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )

    report["engine"], report["attention"] = {}, {}
    for b in args.batch_sizes:
        print(f"== engine, batch {b}", flush=True)
        r = profile_engine(llm, b, args.input_len, args.steps, args.profile_steps, args.seed)
        meta = r.pop("_meta")
        report["engine"][b] = r
        d, p = r["decode_ms_per_step"], r["prefill_ms"]
        print(
            f"  decode ms/step (other procs {r['decode_cpu_load']['other_procs_cores']:.2f} cores; "
            f"without wrappers {r['decode_step_ms_without_wrappers']:.1f}): "
            + ", ".join(f"{k}={v:.2f}" for k, v in d.items())
        )
        print(
            f"  prefill ms ({b}x{args.input_len} tokens, other procs "
            f"{r['prefill_cpu_load']['other_procs_cores']:.2f} cores): "
            + ", ".join(f"{k}={v:.1f}" for k, v in p.items())
        )
        print(f"  aten ops per decode step: {r['aten_ops_per_decode_step']:.0f}")
        for e in r["top_ops_by_self_cpu"][:15]:
            print(
                f"    {e['self_ms_per_step']:7.2f} ms/step {e['pct']:5.1f}%  "
                f"x{e['calls_per_step']:.0f}  "
                f"{e['op']} {e['shapes']}"
            )
        if meta is not None and meta.num_decode:
            report["attention"][b] = a = profile_attention(llm, meta, b)
            print(
                "  attention (one layer): "
                + ", ".join(
                    f"{k}={v['median_ms'] * 1e3:.0f}us" for k, v in a.items() if isinstance(v, dict)
                )
            )

    report["bandwidth"] = bw = bandwidth(model)
    print(
        f"== memory read bandwidth {bw['read_GB_s']:.1f} GB/s; "
        f"layer weights {bw['layer_weight_MB']:.0f} MB "
        f"+ LM head {bw['lm_head_MB']:.0f} MB -> decode floor {bw['decode_floor_ms']:.1f} ms/step"
    )
    report["small_ops"] = profile_small_ops(model, [1, 8, 32, 4096])
    if not args.skip_matmul:
        print("== LM head variants (ms)", flush=True)
        batches = sorted(set([1] + args.batch_sizes))
        report["lm_head"] = profile_lm_head(model.lm_head.weight.data, batches, args.reps)
        print("== layer matmul variants (ms per step, 30 layers)", flush=True)
        report["layer_matmuls"] = profile_layer_matmuls(model, batches, args.reps)
        print("== prefill-size matmuls (ms, one layer's weight)", flush=True)
        pre = {}
        for kind, w in (
            ("gate_up_proj", dense(model.model.layers[0].mlp.gate_up_proj.weight)),
            ("down_proj", dense(model.model.layers[0].mlp.down_proj.weight)),
        ):
            for tokens in (1024, 4096):
                x = torch.randn(tokens, w.shape[1])
                row = {}
                for name, fn in linear_variants(w, tokens).items():
                    if "chunks" in name:
                        continue
                    try:
                        r = bench(lambda: fn(x), reps=5, warmup=1)
                        r["GFLOP_s"] = 2 * tokens * w.numel() / (r["median_ms"] / 1e3) / 1e9
                        row[name] = r
                    except Exception as e:  # noqa: BLE001
                        row[name] = {"error": str(e)[:200]}
                pre[f"{kind} {tokens} tokens"] = row
                print(
                    f"  {kind} x {tokens} tokens: "
                    + ", ".join(
                        f"{n}={r['median_ms']:.1f}ms ({r['GFLOP_s']:.0f} GFLOP/s)"
                        for n, r in row.items()
                        if "median_ms" in r
                    )
                )
        report["prefill_matmuls"] = pre

    llm.shutdown()
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
