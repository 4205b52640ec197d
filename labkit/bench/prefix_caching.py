"""Repeated prompts through the prefix cache (vLLM's benchmark_prefix_caching.py).

`num_prompts` random prompts with lengths in `input_length_range` (an optional shared prefix of
`prefix_len` tokens included), each repeated `repeat_count` times, shuffled (or sorted by
length with `sort`, which puts repeats next to each other); greedy, `output_len` tokens, one
timed generate. Compare with a --no-enable-prefix-caching run to see what the cache saves.
JSON: throughput's keys plus "num_cached_tokens" (prompt tokens served from the cache)."""

from __future__ import annotations

import argparse

import numpy as np

from labkit.bench import common, datasets


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-length-range",
        default="128:256",
        dest="input_length_range",
        help="MIN:MAX prompt tokens, prefix included",
    )
    p.add_argument(
        "--num-prompts", type=int, default=1, dest="num_prompts", help="distinct prompts"
    )
    p.add_argument("--repeat-count", type=int, default=100, dest="repeat_count")
    p.add_argument("--output-len", type=int, default=10, dest="output_len")
    p.add_argument("--prefix-len", type=int, default=0, dest="prefix_len")
    p.add_argument(
        "--sort", action="store_true", help="sort prompts by length instead of shuffling"
    )
    common.add_offline_args(p)


def run(
    *,
    input_length_range: str = "128:256",
    num_prompts: int = 1,
    repeat_count: int = 100,
    output_len: int = 10,
    prefix_len: int = 0,
    sort: bool = False,
    seed: int = 0,
    profile: bool = False,
    profile_dir: str | None = None,
    output_json: str | None = None,
    save_step_log: bool = False,
    disable_tqdm: bool = False,
    llm=None,
    **engine_kwargs,
) -> dict:
    low, high = _parse_range(input_length_range, prefix_len)
    if num_prompts < 1 or repeat_count < 1:
        raise ValueError(
            f"num_prompts={num_prompts!r}, repeat_count={repeat_count!r}: both must be >= 1"
        )
    from labkit import SamplingParams

    with common.engine(llm, seed, engine_kwargs) as llm:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(low - prefix_len, high - prefix_len + 1, size=num_prompts)
        prompts = (
            datasets.random_prompts(common.token_space(llm), lengths, prefix_len, rng)
            * repeat_count
        )
        if sort:
            prompts.sort(key=len)
        else:
            prompts = [prompts[i] for i in rng.permutation(len(prompts))]
        return common.generate_benchmark(
            llm,
            "prefix_caching",
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=output_len),
            count_cached_tokens=True,
            profile=profile,
            profile_dir=profile_dir,
            output_json=output_json,
            save_step_log=save_step_log,
            disable_tqdm=disable_tqdm,
        )


def _parse_range(text: str, prefix_len: int) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(
            f"input_length_range={text!r} is invalid: must be MIN:MAX, e.g. 128:256"
        ) from None
    if not prefix_len < low <= high:
        raise ValueError(
            f"input_length_range={text!r} is invalid: need prefix_len ({prefix_len}) < MIN <= MAX"
        )
    return low, high
