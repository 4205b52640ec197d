"""CPU generation speed: labkit vs HF transformers' generate() on the same prompts, in one run.

The issue's CPU target: on a 2-core machine, default model (SmolLM2-135M-Instruct) in float32,
batches of 8 and of 32 prompts of 128 tokens each generating 64 tokens, labkit's output tokens/s
must be at least 2x HF transformers' generate() measured in the same run.

    python dev/cpu_generate.py                      # batches 8 and 32, both backends
    python dev/cpu_generate.py --batch-sizes 8 --skip-hf

Prompts are seeded random token ids in [100, vocab) (no special tokens), exactly --input-len long,
identical for both backends. Both run greedy with EOS ignored, so every row makes exactly
--output-len tokens. Each backend gets one small warm-up call (other prompts), then one timed
call per batch size (--repeats for more), time.perf_counter around the whole generate() call;
labkit's prefix cache is reset before each. labkit's time is also split into prefill and decode
from its step log. The greedy tokens of the two backends are compared row by row.

On a shared machine: another process using even part of a core makes torch's two OpenMP
threads stall at every parallel region, and wall times balloon (seconds per decode step). Every
timing therefore records how many cores other processes used meanwhile (from /proc/stat), and
`--repeats N` times HF and labkit alternately, back to back, reporting the fastest of each.
`--threads 1` runs both on one torch thread and also times them by the thread's CPU time
(time.thread_time), which other processes cannot inflate: a fair one-core comparison on a busy box.

Writes a JSON file (--output-json) and a markdown table next to it (same name, .md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from labkit.lab.env import device_name

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "dev" / "results" / "cpu_generate.json"
MIN_TOKEN_ID = 100  # SmolLM2's special / control tokens sit well below this


# ---- helpers ------------------------------------------------------------------------------
def machine_info() -> dict:
    import transformers

    return {
        "cpu": device_name("cpu"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class CpuMeter:
    """How busy the rest of the machine was while we measured: the CPU time all processes used
    (/proc/stat) minus our own (os.times), in cores, plus hypervisor steal. On a shared 2-core box
    another process using even half a core slows torch's OpenMP threads a lot, so every timing
    carries this number."""

    def __init__(self):
        self.t0, self.busy0, self.steal0, self.own0 = time.perf_counter(), *self._read()

    @staticmethod
    def _read():
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0.0, 0.0, 0.0
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
        t = os.times()
        return (user + nice + system + irq + softirq) / hz, steal / hz, t.user + t.system

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy, steal, own = self._read()
        return {
            "other_procs_cores": max(0.0, (busy - self.busy0) - (own - self.own0)) / wall,
            "steal_cores": (steal - self.steal0) / wall,
            "own_cores": (own - self.own0) / wall,
            "loadavg_1m": os.getloadavg()[0],
        }


def make_prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1000 + batch)
    return torch.randint(MIN_TOKEN_ID, vocab, (batch, input_len), generator=g).tolist()


def compare_rows(a: list[list[int]], b: list[list[int]]) -> dict:
    """Exact-match fraction, and where the rows that differ first diverge."""
    exact, first_div = 0, []
    for x, y in zip(a, b):
        if x == y:
            exact += 1
        else:
            first_div.append(
                next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            )
    return {
        "rows": len(a),
        "exact_rows": exact,
        "exact_fraction": exact / max(len(a), 1),
        "first_divergence_positions": first_div,
    }


# ---- the two backends ---------------------------------------------------------------------
# Both stay loaded for the whole run (~1 GiB together with labkit's KV cache), so that on a shared
# machine each batch size can time HF and labkit back to back, under the same background load.


class LabkitBackend:
    name = "labkit"

    def __init__(self, output_len: int):
        from labkit import LLM, SamplingParams

        t0 = time.perf_counter()
        self.llm = LLM(dtype="float32")
        self.load_s = time.perf_counter() - t0
        self.vocab = self.llm.config.model_config.vocab_size
        self.output_len = output_len
        self.params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    def warmup(self, input_len: int) -> None:
        """A small batch with a prefill and a few decodes, on other prompts than the timed ones
        (the prefix cache must not serve the timed prefills)."""
        from labkit import SamplingParams

        self.llm.generate(
            [{"prompt_token_ids": p} for p in make_prompts(2, input_len, self.vocab, seed=-1)],
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
            use_tqdm=False,
        )

    def run(self, prompts: list[list[int]]) -> dict:
        llm = self.llm
        n_before = len(llm.step_log())
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()  # a repeat must prefill again, as HF does
        gc.collect()
        engine, step_cpu = llm.engine, {}
        orig_step = engine.step

        def timed_step():  # this thread's CPU time per engine step, keyed by its step record
            n, c = engine.stats().num_steps, time.thread_time()
            out = orig_step()
            if engine.stats().num_steps > n:
                step_cpu[n] = (time.thread_time() - c) * 1e3
            return out

        engine.step = timed_step
        try:
            meter = CpuMeter()
            t, c = time.perf_counter(), time.thread_time()
            outs = llm.generate(
                [{"prompt_token_ids": p} for p in prompts], self.params, use_tqdm=False
            )
            elapsed, cpu = time.perf_counter() - t, time.thread_time() - c
            load = meter.stop()
        finally:
            del engine.step
        steps = llm.step_log().iloc[n_before:].copy()
        steps["cpu_ms"] = [
            step_cpu.get(i, float("nan")) for i in range(n_before, n_before + len(steps))
        ]
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        bad = [len(t_) for t_ in tokens if len(t_) != self.output_len]
        if bad:
            raise RuntimeError(f"labkit: rows with {bad} tokens, expected {self.output_len}")
        pre = steps[steps.num_prefill_tokens > 0]
        dec = steps[steps.num_prefill_tokens == 0]
        phase_cols = ["schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "postprocess_ms"]
        n_out = sum(map(len, tokens))
        return {
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "cpu_load": load,
            "output_tokens": n_out,
            "output_tok_s": n_out / elapsed,
            "output_tok_per_cpu_s": n_out / cpu,
            "tokens": tokens,
            "prefill_cpu_s": pre.cpu_ms.sum() / 1e3,
            "decode_cpu_s": dec.cpu_ms.sum() / 1e3,
            "cpu_ms_per_decode_step": float(dec.cpu_ms.mean()) if len(dec) else None,
            "prefill_s": pre.total_ms.sum() / 1e3,
            "decode_s": dec.total_ms.sum() / 1e3,
            "outside_steps_s": elapsed - steps.total_ms.sum() / 1e3,
            "prefix_cache_hits": int(steps["prefix_cache_hits"].sum())
            if "prefix_cache_hits" in steps
            else None,
            "num_prefill_steps": len(pre),
            "num_decode_steps": len(dec),
            "ms_per_decode_step": float(dec.total_ms.mean()) if len(dec) else None,
            "prefill_phase_ms": {c: float(pre[c].sum()) for c in phase_cols},
            "decode_phase_ms_per_step": {c: float(dec[c].mean()) for c in phase_cols}
            if len(dec)
            else {},
        }

    def describe(self, r: dict) -> str:
        return (
            f"prefill {r['prefill_s']:.2f} s in {r['num_prefill_steps']} step(s), decode "
            f"{r['decode_s']:.2f} s in {r['num_decode_steps']} steps = "
            f"{r['ms_per_decode_step']:.1f} ms/step"
        )

    def close(self) -> None:
        self.llm.shutdown()
        self.llm = None
        gc.collect()


class HFBackend:
    name = "hf"

    def __init__(self, output_len: int):
        from transformers import AutoModelForCausalLM

        from labkit.default_model import default_model_path

        gguf = default_model_path()
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()
        self.load_s = time.perf_counter() - t0
        self.vocab = self.model.config.vocab_size
        self.output_len = output_len
        gen_cfg = self.model.generation_config
        pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else gen_cfg.eos_token_id
        self.pad = pad[0] if isinstance(pad, list) else pad

    def _generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )

    def warmup(self, input_len: int) -> None:
        self._generate(torch.tensor(make_prompts(2, input_len, self.vocab, seed=-1)), 8)

    def run(self, prompts: list[list[int]]) -> dict:
        ids = torch.tensor(prompts, dtype=torch.long)
        gc.collect()
        meter = CpuMeter()
        t, c = time.perf_counter(), time.thread_time()
        out = self._generate(ids, self.output_len)
        elapsed, cpu = time.perf_counter() - t, time.thread_time() - c
        load = meter.stop()
        new = out[:, ids.shape[1] :]
        if new.shape[1] != self.output_len:
            raise RuntimeError(
                f"HF: made {new.shape[1]} new tokens per row, expected {self.output_len}"
            )
        return {
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "cpu_load": load,
            "output_tokens": new.numel(),
            "output_tok_s": new.numel() / elapsed,
            "output_tok_per_cpu_s": new.numel() / cpu,
            "tokens": new.tolist(),
        }

    def describe(self, r: dict) -> str:
        return ""

    def close(self) -> None:
        self.model = None
        gc.collect()


# ---- report -------------------------------------------------------------------------------
def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def write_markdown(path: Path, report: dict) -> None:
    m, a = report["machine"], report["args"]
    cpu_clock = report["clock"] != "wall"
    unit = "tok/CPU-s" if cpu_clock else "tok/s"
    lines = [
        "# CPU generate benchmark: labkit vs HF transformers",
        "",
        f"- Date: {report['date']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch threads: {m['torch_threads']}, "
        f"Python {m['python']}",
        f"- torch {m['torch']}, transformers {m['transformers']}",
        f"- Command: `{report['command']}`",
        f"- Workload: SmolLM2-135M-Instruct float32, {a['input_len']}-token prompts of random ids, "
        f"{a['output_len']} greedy output tokens per prompt (EOS ignored); one small warm-up per "
        f"backend, then {a['repeats']} timed generate() call(s) per batch size and backend",
        f"- Clock: {report['clock']}"
        + (
            " (the work of the one torch thread; other processes cannot inflate it)"
            if cpu_clock
            else " (time.perf_counter)"
        ),
        "- Load time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["load_s"].items()),
        "",
        f"| batch | HF {unit} | labkit {unit} | speedup | labkit prefill s | labkit decode s "
        "| ms / decode step | greedy rows = HF | HF / labkit wall tok/s "
        "| other procs' cores (HF / labkit) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        match = (
            "-" if row["match_exact_rows"] is None else f"{row['match_exact_rows']}/{row['batch']}"
        )
        lines.append(
            f"| {row['batch']} | {fmt(row['hf_tok_s'])} | {fmt(row['labkit_tok_s'])} "
            f"| {fmt(row['speedup'], '.2f') + 'x' if row['speedup'] else '-'} "
            f"| {fmt(row['labkit_prefill_s'], '.2f')} | {fmt(row['labkit_decode_s'], '.2f')} "
            f"| {fmt(row['ms_per_decode_step'])} | {match} "
            f"| {fmt(row['hf_wall_tok_s'])} / {fmt(row['labkit_wall_tok_s'])} "
            f"| {fmt(row['hf_other_cores'], '.2f')} / {fmt(row['labkit_other_cores'], '.2f')} |"
        )
    lines += [
        "",
        "Target: speedup >= 1.0x (at or above HF) at every batch size (2 cores, wall time).",
        "",
        "The last column is the CPU time other processes used during each timed call, in "
        "cores (from /proc/stat): on a 2-core machine anything above ~0.1 disturbs wall "
        "times (torch's OpenMP threads stall when a core is taken).",
    ]
    if a.get("repeats", 1) > 1:
        lines += [
            "",
            f"Each number is the fastest of {a['repeats']} timed calls per backend (HF and "
            "labkit alternate, back to back). Speedups of each HF/labkit pair: "
            + "; ".join(
                f"batch {row['batch']}: " + ", ".join(f"{x:.2f}x" for x in row["paired_speedups"])
                for row in report["summary"]
            )
            + ".",
        ]
    key = "cpu_s" if cpu_clock else "elapsed_s"
    lk = {b: min(rs["labkit"], key=lambda r: r[key]) for b, rs in report["runs"].items()}
    lines += [
        "",
        "labkit per-phase times from its step log (wall; decode: mean ms per step; "
        "prefill: total ms):",
        "",
        "| batch | phase | schedule | prepare | forward | sample | postprocess |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for b, r in lk.items():
        for name, d in (
            ("prefill", r["prefill_phase_ms"]),
            ("decode/step", r["decode_phase_ms_per_step"]),
        ):
            if d:
                lines.append(
                    f"| {b} | {name} | "
                    + " | ".join(
                        fmt(d[c], ".2f")
                        for c in (
                            "schedule_ms",
                            "prepare_ms",
                            "forward_ms",
                            "sample_ms",
                            "postprocess_ms",
                        )
                    )
                    + " |"
                )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed calls per batch size and backend; the fastest is reported",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice, one per core); with 1, tok/s by "
        "CPU time is reported too and the table uses it",
    )
    ap.add_argument("--skip-hf", action="store_true", help="run labkit only")
    ap.add_argument("--output-json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_clock = torch.get_num_threads() == 1  # thread CPU time covers all the work only then

    from labkit.config import EngineConfig
    from labkit.engine.resolved_config import resolve

    vocab = resolve(EngineConfig.from_kwargs(dtype="float32")).model_config.vocab_size
    prompt_sets = {b: make_prompts(b, args.input_len, vocab, args.seed) for b in args.batch_sizes}

    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(x) for x in [Path(sys.executable).name] + sys.argv),
        "machine": machine_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "clock": "thread CPU time" if cpu_clock else "wall",
    }
    print(f"machine: {report['machine']}", flush=True)

    backends = [LabkitBackend(args.output_len)]
    if not args.skip_hf:
        backends.append(HFBackend(args.output_len))
    for be in backends:
        be.warmup(args.input_len)
    report["load_s"] = {be.name: be.load_s for be in backends}

    report["runs"] = {}
    summary = []
    for b in args.batch_sizes:
        runs = {be.name: [] for be in backends}
        for rep in range(args.repeats):
            # Alternate the order, so neither backend always runs first after the other.
            for be in backends if rep % 2 == 0 else backends[::-1]:
                r = be.run(prompt_sets[b])
                runs[be.name].append(r)
                extra = be.describe(r)
                print(
                    f"[{be.name}] batch {b} run {rep + 1}/{args.repeats}: {r['elapsed_s']:.2f} s, "
                    f"{r['output_tok_s']:.1f} output tok/s (CPU time {r['cpu_s']:.2f} s: "
                    f"{r['output_tok_per_cpu_s']:.1f} tok/CPU-s){'; ' + extra if extra else ''} "
                    f"(other processes used {r['cpu_load']['other_procs_cores']:.2f} cores)",
                    flush=True,
                )
        # With --repeats > 1 the fastest call of each backend is reported (the least disturbed).
        key = "cpu_s" if cpu_clock else "elapsed_s"
        best = {name: min(rs, key=lambda r: r[key]) for name, rs in runs.items()}
        lk, hf = best["labkit"], best.get("hf")
        cmp = compare_rows(lk["tokens"], hf["tokens"]) if hf else None
        paired = [h[key] / l[key] for l, h in zip(runs["labkit"], runs["hf"])] if hf else []
        tps = "output_tok_per_cpu_s" if cpu_clock else "output_tok_s"
        summary.append(
            {
                "batch": b,
                "clock": report["clock"],
                "hf_tok_s": hf[tps] if hf else None,
                "labkit_tok_s": lk[tps],
                "speedup": lk[tps] / hf[tps] if hf else None,
                "paired_speedups": paired,
                "hf_wall_tok_s": hf["output_tok_s"] if hf else None,
                "labkit_wall_tok_s": lk["output_tok_s"],
                "labkit_prefill_s": lk["prefill_cpu_s" if cpu_clock else "prefill_s"],
                "labkit_decode_s": lk["decode_cpu_s" if cpu_clock else "decode_s"],
                "ms_per_decode_step": lk[
                    "cpu_ms_per_decode_step" if cpu_clock else "ms_per_decode_step"
                ],
                "match_exact_rows": cmp["exact_rows"] if cmp else None,
                "match_exact_fraction": cmp["exact_fraction"] if cmp else None,
                "first_divergence_positions": cmp["first_divergence_positions"] if cmp else None,
                "hf_other_cores": hf["cpu_load"]["other_procs_cores"] if hf else None,
                "labkit_other_cores": lk["cpu_load"]["other_procs_cores"],
            }
        )
        for name, rs in runs.items():
            for r in rs:
                if r is not best[name]:
                    r.pop("tokens")
        report["runs"][b] = runs
    report["summary"] = summary
    for be in backends:
        be.close()

    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(report, indent=1))
    md = args.output_json.with_suffix(".md")
    write_markdown(md, report)
    print(md.read_text())
    print(f"wrote {args.output_json} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
