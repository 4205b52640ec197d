"""Latency of one batch, end to end (vLLM's benchmark_latency.py).

`batch_size` random prompts of `input_len` tokens, each generating exactly `output_len` tokens
(EOS ignored). The timed region is one `llm.generate` call (`llm.beam_search` with
use_beam_search), repeated num_iters times after num_iters_warmup untimed ones."""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm.auto import tqdm

from labkit.bench import common
from labkit.observe.trace import trace_region

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=32, dest="input_len")
    p.add_argument("--output-len", type=int, default=128, dest="output_len")
    p.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    p.add_argument(
        "--n", type=int, default=1, help="sequences per prompt (beam width with --use-beam-search)"
    )
    p.add_argument("--use-beam-search", action="store_true", dest="use_beam_search")
    p.add_argument("--num-iters-warmup", type=int, default=10, dest="num_iters_warmup")
    p.add_argument("--num-iters", type=int, default=30, dest="num_iters")
    common.add_offline_args(p)


def run(
    *,
    input_len: int = 32,
    output_len: int = 128,
    batch_size: int = 8,
    n: int = 1,
    use_beam_search: bool = False,
    num_iters_warmup: int = 10,
    num_iters: int = 30,
    seed: int = 0,
    profile: bool = False,
    profile_dir: str | None = None,
    output_json: str | None = None,
    save_step_log: bool = False,
    disable_tqdm: bool = False,
    llm=None,
    **engine_kwargs,
) -> dict:
    """{"avg_latency", "latencies" (seconds, one per iteration), "percentiles" {"10".."99"}}.
    Pass `llm=` to reuse a loaded engine; otherwise engine_kwargs build one (and close it)."""
    if num_iters < 1:
        raise ValueError(f"num_iters={num_iters!r} is invalid: must be >= 1")
    with common.engine(llm, seed, engine_kwargs) as llm:
        requests = common.load_workload(
            llm,
            "random",
            num_prompts=batch_size,
            input_len=input_len,
            output_len=output_len,
            seed=seed,
        )
        generate = _generate_fn(
            llm, [r.engine_prompt() for r in requests], n, output_len, use_beam_search
        )
        for _ in tqdm(range(num_iters_warmup), desc="Warmup iterations", disable=disable_tqdm):
            generate()
        first_step = common.num_steps(llm)
        latencies = []
        with trace_region("latency", profile, profile_dir):
            for _ in tqdm(range(num_iters), desc="Timed iterations", disable=disable_tqdm):
                start = time.perf_counter()
                generate()
                latencies.append(time.perf_counter() - start)
        result = {
            "avg_latency": float(np.mean(latencies)),
            "latencies": latencies,
            "percentiles": common.percentiles(latencies, PERCENTILES),
        }
        return common.write_outputs(
            "latency",
            result,
            output_json=output_json,
            save_step_log=save_step_log,
            llm=llm,
            first_step=first_step,
        )


def _generate_fn(llm, prompts: list[dict], n: int, output_len: int, use_beam_search: bool):
    if use_beam_search:
        if not hasattr(llm, "beam_search"):
            raise NotImplementedError("--use-beam-search: this labkit's LLM has no beam_search yet")
        from labkit import BeamSearchParams

        params = BeamSearchParams(beam_width=n, max_tokens=output_len, ignore_eos=True)
        return lambda: llm.beam_search(prompts, params)
    from labkit import SamplingParams

    params = SamplingParams(n=n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len)
    return lambda: llm.generate(prompts, params, use_tqdm=False)
