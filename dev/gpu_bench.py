"""GPU benchmark for the fast path, one call on a lent card: the card's ceilings, a
correctness check, then labkit vs HF transformers vs the floor on the Qwen2.5-7B-Instruct shape
with random weights in bf16.

  python dev/gpu_bench.py --out DIR [--config DIR] [--tiny DIR] [--workloads a,a64,b,c] [--skip-hf]
      [--quantization fp8] [--kv-cache-dtype fp8]

--config: another shape's config directory (data/configs/Qwen3-30B-A3B, Qwen3-8B); the floors
use labkit's roofline shape, which counts a MoE layer's routed experts only.
--quantization fp8: labkit's engines quantize the layers' weights at load (FP8 per output row,
inputs per token; HF stays bf16), and the floors count those weights at 1 byte plus their scales.
--kv-cache-dtype fp8: labkit's KV caches in float8_e4m3fn; the floors count the KV at 1 byte.
Workloads: (a) one decode step, batch 1, context 1024 (a64: batch 64); (b) vLLM's quickstart
latency run, batch 8, input 1024, output 1024; (c) throughput, 256 requests with input and
output lengths uniform in [100, 1024] (seed 0), ignore_eos; c2 (only when named): a fresh
engine's start-up, then its first and second sampled 256-request runs (first_vs_second).
Floors come from ceilings measured in the same run: a large device-to-device copy (bytes read +
written per second) and a bf16 8192^3 matmul. (c) has two: the compute floor (every token's
matmuls at the matmul rate) and the step floor, the sum over the run's own steps (its step log)
of what each step must do at the least: a decode step reads the weights and the KV its blocks
hold, or does its matmuls, whichever takes longer; a prefill step does its matmuls. The step
floor is the one a schedule cannot beat: a decode step re-reads every running sequence's KV.
Prints a table last; writes gpu_bench.json (and the step logs) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
QWEN7B = REPO / "data" / "configs" / "Qwen2.5-7B-Instruct"
# Decode-step workloads: "a" at batch 1, "a64" at batch 64, each at context 1024.
DECODE_WORKLOADS = ("a", "a64")


def batch_of(workload: str) -> int:
    return int(workload[1:] or 1)


def ceilings() -> dict:
    from triton.testing import do_bench

    n = 1 << 30  # 2 GiB of bf16 each way
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    copy_bw = 2 * a.numel() * 2 / (ms * 1e-3)
    del a, b
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median")
    flops = 2 * 8192**3 / (ms * 1e-3)
    del x, y
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy_bw, "bf16_flops_per_s": flops}


def model_numbers(cfg: dict, quantization: str | None = None, kv_cache_dtype: str = "auto") -> dict:
    """Weight and KV bytes from labkit's roofline shape (MoE layers: the experts a batch is
    expected to route to; fp8: the layers' weights at 1 byte plus a float32 scale per output
    row, counted as if every row were `hidden_size` long, the shortest; an fp8 KV cache at 1
    byte an element)."""
    from labkit.lab.roofline import ModelShape

    moe = "num_experts" in cfg
    heads = cfg["num_attention_heads"]
    shape = ModelShape(
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        heads,
        cfg["num_key_value_heads"],
        cfg.get("head_dim") or cfg["hidden_size"] // heads,
        cfg["intermediate_size"],
        cfg["vocab_size"],
        2,
        moe_layers=cfg["num_hidden_layers"] if moe else 0,
        experts=cfg.get("num_experts", 0),
        experts_per_tok=cfg.get("num_experts_per_tok", 0),
        expert_intermediate=cfg.get("moe_intermediate_size", 0),
        layer_weight_bytes=1 + 4 / cfg["hidden_size"] if quantization == "fp8" else None,
        kv_elem_bytes=None if kv_cache_dtype == "auto" else 1,
    )
    return {
        "weight_bytes_for": shape.weight_bytes_for,
        "kv_bytes_per_token": shape.kv_bytes_per_token,
        "matmul_params": shape.body_params + shape.head_params,  # per token
    }


def floors(num: dict, ceil: dict) -> dict:
    bw, fl = ceil["copy_bytes_per_s"], ceil["bf16_flops_per_s"]

    def step(batch: int, ctx: int) -> float:  # a decode step reads its weights and every KV
        return (num["weight_bytes_for"](batch) + batch * ctx * num["kv_bytes_per_token"]) / bw

    out = {f"{w}_s": step(batch_of(w), 1024) for w in DECODE_WORKLOADS}
    prefill_b = 2 * num["matmul_params"] * 8 * 1024 / fl
    out["b_s"] = prefill_b + sum(step(8, 1024 + t) for t in range(1024))
    return out


def step_floor_s(steps, num: dict, ceil: dict, block_size: int) -> float:
    """The sum over a run's steps (its step log) of each step's least time: a decode-only step
    reads its weights and its blocks' KV or does its matmuls, whichever is longer; a step with
    prefill tokens does its matmuls (its reads hide under them)."""
    bw, fl = ceil["copy_bytes_per_s"], ceil["bf16_flops_per_s"]
    rows = steps.num_prefill_tokens + steps.num_decode_seqs
    compute = 2 * num["matmul_params"] * rows / fl
    kv = steps.kv_blocks_used * block_size * num["kv_bytes_per_token"]
    weights = steps.num_decode_seqs.map(num["weight_bytes_for"])
    memory = ((weights + kv) / bw).where(steps.num_prefill_tokens == 0, 0.0)
    return float(compute.where(compute > memory, memory).sum())


def hf_baselines(workloads: set[str], config_dir: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    out = {}
    with torch.inference_mode():
        for w in sorted(workloads & set(DECODE_WORKLOADS)):
            ids = torch.randint(1000, 100000, (batch_of(w), 1024), device="cuda")
            r = model(ids, use_cache=True, logits_to_keep=1)  # not [B, 1024, vocab]
            past, nxt = r.past_key_values, r.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(20):
                torch.cuda.synchronize()
                t = time.perf_counter()
                r = model(nxt, past_key_values=past, use_cache=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                past, nxt = r.past_key_values, r.logits[:, -1:].argmax(-1)
            out[f"{w}_s"] = statistics.median(times[5:])
            del r, past
        if "b" in workloads:
            ids = torch.randint(1000, 100000, (8, 1024), device="cuda")
            kw = dict(max_new_tokens=1024, min_new_tokens=1024, do_sample=False, pad_token_id=0)
            model.generate(ids[:, :32], **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            torch.cuda.synchronize()
            out["b_s"] = time.perf_counter() - t
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def phases(steps) -> dict:
    """Median milliseconds per phase of the decode-only steps, and the prefill steps' totals:
    where a workload's time goes (host phases vs the forward)."""
    dec = steps[steps.num_prefill_tokens == 0]
    cols = ["schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "postprocess_ms", "total_ms"]
    out = {f"decode_median_{c}": float(dec[c].median()) for c in cols if len(dec)}
    out.update(
        decode_steps=len(dec),
        decode_total_s=float(dec.total_ms.sum()) / 1e3,
        prefill_steps=int(len(steps) - len(dec)),
        prefill_total_s=float(steps.total_ms.sum() - dec.total_ms.sum()) / 1e3,
    )
    return out


def sampling_modes() -> dict:
    """The sampling a workload runs under, by name: greedy, and the truncations users set."""
    from labkit import SamplingParams

    kw = dict(ignore_eos=True)
    return {
        "greedy": SamplingParams(temperature=0, **kw),
        "top_p": SamplingParams(temperature=0.8, top_p=0.95, **kw),
        "top_k": SamplingParams(temperature=0.8, top_k=50, **kw),
        "min_p": SamplingParams(temperature=1.0, min_p=0.1, **kw),
    }


def e2e_step(run, prompt: dict, sp, short: int = 64, long: int = 320) -> float:
    """Seconds per decode step through `generate`: two runs of one request differing only in
    their output length, the difference over the extra tokens (prefill and start-up cancel)."""
    t = {}
    for n in (short, long):
        t[n] = min(run([prompt], dataclasses.replace(sp, max_tokens=n))[0] for _ in range(2))
    return (t[long] - t[short]) / (long - short)


def labkit_runs(
    workloads: set[str],
    spec: str,
    out_dir: Path,
    config_dir: Path,
    quantization: str | None,
    kv_cache_dtype: str = "auto",
) -> dict:
    """One engine configuration, `spec` as in --tp: the TP size, then "nccl" for every
    all-reduce through NCCL, "sync" for async scheduling off, "nopdl" for kernels launched
    without programmatic dependent launch, "pdlwait" for PDL without the early trigger,
    "nogemv" for every matmul through cuBLAS, and/or "torchsampler" for the sampler's torch path
    (e.g. "2nccl", "1sync", "1nopdl", "1nogemv", "1torchsampler")."""
    from labkit import LLM, SamplingParams

    # Each engine reads these when it starts (its TP workers inherit them)
    os.environ["LABKIT_PDL"] = "0" if "nopdl" in spec else "wait" if "pdlwait" in spec else "1"
    os.environ["LABKIT_GEMV"] = "0" if "nogemv" in spec else "1"
    os.environ["LABKIT_SAMPLER"] = "0" if "torchsampler" in spec else "1"
    modes = sampling_modes()
    res = {}
    t0 = time.perf_counter()
    llm = LLM(
        str(config_dir),
        load_format="dummy",
        dtype="bfloat16",
        tensor_parallel_size=int(re.match(r"\d+", spec).group()),
        skip_tokenizer_init=True,
        max_model_len=4096,
        enable_prefix_caching=False,
        disable_custom_all_reduce="nccl" in spec,
        async_scheduling="sync" not in spec,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
    )
    res["startup_s"] = time.perf_counter() - t0
    tp = spec
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[dict]:
        return [
            {"prompt_token_ids": torch.randint(1000, 100000, (length,), generator=g).tolist()}
            for _ in range(n)
        ]

    def run(ps, sps) -> tuple[float, int]:
        n0 = len(llm.step_log())
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(ps, sps, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t, n0

    run(prompts(2, 64), SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up

    def save() -> None:  # after each workload: a run cut short still leaves its figures
        (out_dir / f"labkit_tp{tp}.partial.json").write_text(json.dumps(res, indent=2))

    for w in sorted(workloads & set(DECODE_WORKLOADS)):
        batch = batch_of(w)
        _, n0 = run(
            prompts(batch, 1024), SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        )
        steps = llm.step_log().iloc[n0:]
        dec = steps[steps.num_decode_seqs == batch]
        res[f"{w}_s"] = float(dec.total_ms.iloc[5:].median()) / 1e3
        res[f"{w}_forward_s"] = float(dec.forward_ms.iloc[5:].median()) / 1e3
        res[f"{w}_phases"] = phases(steps.iloc[5:])
        if w == "a":  # what a user sees: the step from two generate calls' difference
            for mode, sp in modes.items():
                res[f"a_e2e_{mode}_s"] = e2e_step(run, prompts(1, 1024)[0], sp)
        save()
    if "b" in workloads:
        res["b_s"], n0 = run(
            prompts(8, 1024),
            SamplingParams(temperature=1.0, top_p=1.0, max_tokens=1024, ignore_eos=True),
        )
        llm.step_log().iloc[n0:].to_csv(out_dir / f"steps_b_tp{tp}.csv", index=False)
        res["b_phases"] = phases(llm.step_log().iloc[n0:])
        save()
    if "c" in workloads:
        rng = torch.Generator().manual_seed(0)
        lens_in = torch.randint(100, 1025, (256,), generator=rng).tolist()
        lens_out = torch.randint(100, 1025, (256,), generator=rng).tolist()
        ps = [
            {"prompt_token_ids": torch.randint(1000, 100000, (n,), generator=g).tolist()}
            for n in lens_in
        ]
        res["c_output_tokens"] = sum(lens_out)
        res["c_total_tokens"] = sum(lens_out) + sum(lens_in)
        for mode, sp in modes.items():  # the same requests under each sampling mode
            sps = [dataclasses.replace(sp, max_tokens=m) for m in lens_out]
            res[f"c_{mode}_s"], n0 = run(ps, sps)
            llm.step_log().iloc[n0:].to_csv(out_dir / f"steps_c_{mode}_tp{tp}.csv", index=False)
            res[f"c_{mode}_phases"] = phases(llm.step_log().iloc[n0:])
            save()
        res["c_s"] = res["c_greedy_s"]
    res["kv_blocks"] = llm.engine.stats().kv_blocks_total
    res["block_size"] = llm.config.block_size
    llm.shutdown()
    return res


def first_vs_second(config_dir: Path) -> dict:
    """Workload c2: a fresh engine with the default limits (its start-up timed), then a
    256-request sampled run (c's lengths, temperature 0.8, top_p 0.95) twice, each with fresh
    prompt ids (no prefix-cache hits): what the first run still compiles or loads shows as
    first_s > second_s."""
    from labkit import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(config_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True)
    res = {"startup_s": time.perf_counter() - t0}
    g = torch.Generator().manual_seed(0)
    lens_in = torch.randint(100, 1025, (256,), generator=g).tolist()
    lens_out = torch.randint(100, 1025, (256,), generator=g).tolist()
    sps = [
        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=m, ignore_eos=True) for m in lens_out
    ]
    for run in ("first", "second"):
        ps = [
            {"prompt_token_ids": torch.randint(1000, 100000, (n,), generator=g).tolist()}
            for n in lens_in
        ]
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(ps, sps, use_tqdm=False)
        torch.cuda.synchronize()
        res[f"{run}_s"] = time.perf_counter() - t
    res["first_over_second"] = res["first_s"] / res["second_s"]
    llm.shutdown()
    return res


def check_correctness(tiny: Path | None) -> dict:
    """Greedy tokens on CUDA (Triton backend, graphs) vs the CPU path and HF, float32 and bf16."""
    if tiny is None:
        return {"skipped": "no --tiny checkpoint"}
    if "," in str(tiny):  # several checkpoints: one set of keys each, prefixed by its name
        return {
            f"{Path(t).name}/{k}": v
            for t in str(tiny).split(",")
            for k, v in check_correctness(Path(t)).items()
        }
    from transformers import AutoModelForCausalLM

    from labkit import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, 40000, (n,), generator=g).tolist()
        for n in (1, 7, 33, 100, 250, 17, 64, 3)
    ]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    out = {}
    ref = {}
    t0 = time.perf_counter()

    def progress(what: str) -> None:  # where a long check spends its time
        print(f"  [correctness {tiny.name}] {what} at {time.perf_counter() - t0:.0f}s", flush=True)

    for dtype in ("float32", "bfloat16"):
        hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=getattr(torch, dtype)).cuda().eval()
        ref[dtype] = []
        for p in prompts:
            r = hf.generate(
                torch.tensor([p], device="cuda"),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            ref[dtype].append(r[0, len(p) :].tolist())
        del hf
    progress("HF references")
    with LLM(str(tiny), device="cpu", dtype="float32") as cpu:
        cpu_ids = [
            o.outputs[0].token_ids
            for o in cpu.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        ]
    progress("CPU engine")
    for dtype in ("float32", "bfloat16"):
        for eager, asy in ((True, True), (False, True), (False, False)):
            # max_num_seqs 16: the 8 prompts fit, and few graphs are captured (one call, many LLMs)
            with LLM(
                str(tiny),
                dtype=dtype,
                enforce_eager=eager,
                max_num_batched_tokens=128,
                block_size=16,
                async_scheduling=asy,
                max_num_seqs=16,
            ) as llm:
                got = [
                    o.outputs[0].token_ids
                    for o in llm.generate(
                        [{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False
                    )
                ]
            key = f"{dtype}_{'eager' if eager else 'graphs'}{'' if asy else '_sync'}"
            progress(key)
            out[key + "_eq_hf"] = sum(a == b for a, b in zip(got, ref[dtype])) / len(prompts)
            out[key + "_first4_eq_hf"] = sum(a[:4] == b[:4] for a, b in zip(got, ref[dtype])) / len(
                prompts
            )
            if dtype == "float32":
                out[key + "_eq_cpu"] = sum(a == b for a, b in zip(got, cpu_ids)) / len(prompts)
    # tp=2 where there are two cards (the tiny checkpoint's 2 KV heads split no further)
    for tp in range(2, min(torch.cuda.device_count(), 2) + 1, 2):
        with LLM(str(tiny), dtype="float32", tensor_parallel_size=tp) as llm:
            got = [
                o.outputs[0].token_ids
                for o in llm.generate(
                    [{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False
                )
            ]
        out[f"float32_graphs_tp{tp}_eq_tp1"] = sum(a == b for a, b in zip(got, cpu_ids)) / len(
            prompts
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--tiny", default=None, help="tiny checkpoint dir(s), comma-separated")
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--tp", default="1")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--config", default=str(QWEN7B), help="the model shape's config directory")
    ap.add_argument("--quantization", default=None, choices=["fp8"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    wl = set(args.workloads.split(","))
    result = {
        "card": torch.cuda.get_device_name(),
        "num_gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python dev/gpu_bench.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)
        ),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "errors": {},
    }

    def guarded(name, fn):
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:
            result["errors"][name] = traceback.format_exc()
            print(result["errors"][name], flush=True)
        print(f"[{name}] {time.perf_counter() - t:.1f}s", flush=True)
        (out_dir / "gpu_bench.json").write_text(json.dumps(result, indent=2, default=str))

    guarded("ceilings", ceilings)
    if not args.skip_hf:
        guarded("hf", lambda: hf_baselines(wl & {"a", "a64", "b"}, Path(args.config)))
    # "--tp 1,1sync,1nopdl,1pdlwait,1nogemv,2,2nccl,4": see labkit_runs
    tps = [t for t in args.tp.split(",") if t]  # --tp "": no labkit runs (a correctness-only call)
    for spec in tps:
        guarded(
            f"labkit_tp{spec}",
            lambda spec=spec: labkit_runs(
                wl if spec.startswith("1") else wl & {"b"},
                spec,
                out_dir,
                Path(args.config),
                args.quantization,
                args.kv_cache_dtype,
            ),
        )

    if "c2" in wl:
        guarded("labkit_c2", lambda: first_vs_second(Path(args.config)))
    # Last, so that a call cut short by its time limit still has the timings.
    guarded("correctness", lambda: check_correctness(Path(args.tiny) if args.tiny else None))

    cfg = json.loads((Path(args.config) / "config.json").read_text())
    num = model_numbers(cfg, args.quantization, args.kv_cache_dtype)
    rows = []
    if "ceilings" in result:
        fl = floors(num, result["ceilings"])
        result["floors"] = {k: v for k, v in fl.items() if k != "step"}
        hf = result.get("hf", {})
        for tp in tps:
            lk = result.get(f"labkit_tp{tp}", {})
            for w in (*DECODE_WORKLOADS, "b"):
                if f"{w}_s" in lk:
                    rows.append(
                        (
                            f"({w}) tp={tp}",
                            lk[f"{w}_s"],
                            hf.get(f"{w}_s") if tp.startswith("1") else None,
                            fl[f"{w}_s"],
                        )
                    )
            for mode in ("greedy", "top_p", "top_k", "min_p"):
                if f"a_e2e_{mode}_s" in lk:  # through generate, beside the forward-only (a)
                    rows.append((f"(a) e2e {mode}", lk[f"a_e2e_{mode}_s"], None, fl["a_s"]))
            if "c_s" in lk:
                flops = 2 * num["matmul_params"] * lk["c_total_tokens"]  # active params
                compute_floor_tok_s = lk["c_output_tokens"] / (
                    flops / result["ceilings"]["bf16_flops_per_s"]
                )
                steps_csv = out_dir / f"steps_c_greedy_tp{tp}.csv"
                if steps_csv.exists() and "block_size" in lk:
                    floor_s = step_floor_s(
                        pd.read_csv(steps_csv), num, result["ceilings"], lk["block_size"]
                    )
                    result[f"c_step_floor_s_tp{tp}"] = floor_s
                    rows.append(("(c) greedy s, step floor", lk["c_greedy_s"], None, floor_s))
                for mode in ("greedy", "top_p", "top_k", "min_p"):
                    tok_s = lk["c_output_tokens"] / lk[f"c_{mode}_s"]
                    result[f"c_{mode}_output_tok_s_tp{tp}"] = tok_s
                    result[f"c_{mode}_fraction_of_compute_floor_tp{tp}"] = (
                        tok_s / compute_floor_tok_s
                    )
                    result[f"c_{mode}_vs_greedy_tp{tp}"] = lk["c_greedy_s"] / lk[f"c_{mode}_s"]
                    rows.append((f"(c) {mode} out tok/s", tok_s, None, compute_floor_tok_s))
    (out_dir / "gpu_bench.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=1, default=str))
    print(f"\ncard: {result['card']}  ceilings: {result.get('ceilings')}")
    print(
        f"{'workload':<24}{'labkit':>12}{'HF':>12}{'floor':>12}{'labkit/floor':>14}{'HF/labkit':>11}"
    )
    for name, lk, hf, fl in rows:
        ratio = lk / fl  # times: x the floor; tok/s: the fraction of the floor's rate reached
        print(
            f"{name:<24}{lk:>12.4f}{(hf or float('nan')):>12.4f}{fl:>12.4f}{ratio:>14.2f}"
            f"{((hf / lk) if hf else float('nan')):>11.2f}"
        )
    print("errors:", list(result["errors"]))


if __name__ == "__main__":
    main()
