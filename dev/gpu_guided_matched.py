"""Structured output's cost at equal work: `labkit bench guided --dataset json`'s requests run
under their JSON schemas, then the same prompts unconstrained with each request held to the
length its constrained run produced (ignore_eos), alternately, twice, in one engine.

With random weights an unconstrained request never emits EOS while a constrained one stops when
its JSON closes, so the benchmark's own ratio-0.0 vs ratio-1.0 runs compare different amounts of
work; here both runs generate the same tokens per request.

  python dev/gpu_guided_matched.py --model M --out DIR [--num-prompts 256] [--output-len 256]

Prints a table last; writes gpu_guided_matched.json and each run's step log
(steps_json0.csv, steps_free0.csv, ...) under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from labkit import LLM, SamplingParams
from labkit.bench.guided import correct_rate, sample_requests, structured


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="out")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", seed=0)
    reqs = sample_requests(llm.get_tokenizer(), "json", args.num_prompts, args.output_len, None, 0)
    prompts = [r.prompt for r in reqs]

    def params(max_tokens: int, so=None) -> SamplingParams:
        return SamplingParams(
            temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=max_tokens,
            structured_outputs=so,
        )  # fmt: skip

    def timed(ps: list[SamplingParams], name: str):
        n0 = len(llm.step_log())
        t = time.perf_counter()
        outs = llm.generate(prompts, ps, use_tqdm=False)  # returns when every token is back
        elapsed = time.perf_counter() - t
        steps = llm.step_log().iloc[n0:]
        steps.to_csv(out_dir / f"steps_{name}.csv", index=False)
        span = steps.start_time.iloc[-1] - steps.start_time.iloc[0] + steps.total_ms.iloc[-1] / 1e3
        phases = ["forward_ms", "sample_ms", "structured_ms", "postprocess_ms", "total_ms"]
        print(
            f"{name}: {elapsed:.3f} s, {len(steps)} steps over {span:.3f} s (sum of step totals"
            f" {steps.total_ms.sum() / 1e3:.3f} s); step medians "
            + ", ".join(f"{c} {steps[c].median():.2f}" for c in phases),
            flush=True,
        )
        return elapsed, outs

    constrained = [params(r.expected_output_len, structured(r)) for r in reqs]
    llm.generate(prompts[:5], constrained[:5], use_tqdm=False)  # compile those grammars
    result = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "command": "python dev/gpu_guided_matched.py "
              + f"--model {args.model} --num-prompts {args.num_prompts} "
              + f"--output-len {args.output_len}", "runs": []}  # fmt: skip
    for i in range(2):
        t_json, outs = timed(constrained, f"json{i}")
        lens = [len(o.outputs[0].token_ids) for o in outs]
        texts = [o.outputs[0].text for o in outs]
        t_free, free = timed([params(n) for n in lens], f"free{i}")
        assert [len(o.outputs[0].token_ids) for o in free] == lens
        steps = llm.step_log()
        result["runs"].append(
            {
                "json_s": t_json,
                "free_s": t_free,
                "output_tokens": sum(lens),
                "json_output_tok_s": sum(lens) / t_json,
                "free_output_tok_s": sum(lens) / t_free,
                "json_vs_free": t_free / t_json,
                "correct_rate(%)": correct_rate(reqs, texts),
                "structured_ms_median": float(
                    steps.structured_ms[steps.structured_ms > 0].median()
                ),
            }
        )
    (out_dir / "gpu_guided_matched.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))
    print(f"\n{'run':<6}{'json tok/s':>12}{'free tok/s':>12}{'json/free':>11}{'correct %':>11}")
    for i, r in enumerate(result["runs"]):
        print(
            f"{i:<6}{r['json_output_tok_s']:>12.0f}{r['free_output_tok_s']:>12.0f}"
            f"{r['json_vs_free']:>11.3f}{r['correct_rate(%)']:>11.1f}"
        )


if __name__ == "__main__":
    main()
