"""Long-document QA throughput (vLLM's benchmark_long_document_qa_throughput.py).

`num_documents` distinct random documents of exactly `document_length` tokens, each asked
`repeat_count` times in `repeat_mode` order (random: shuffled; tile: d0 d1 .. d0 d1 ..;
interleave: d0 d0 .. d1 d1 ..), greedy, `output_len` tokens, one timed generate after a warm-up
generate on other documents of the same length. The prefix cache decides how much of the
repeats' prefill is saved. JSON: throughput's keys plus "num_cached_tokens"."""

from __future__ import annotations

import argparse

import numpy as np

from labkit.bench import common, datasets

REPEAT_MODES = ("random", "tile", "interleave")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--document-length",
        type=int,
        default=20000,
        dest="document_length",
        help="tokens per document",
    )
    p.add_argument("--num-documents", type=int, default=8, dest="num_documents")
    p.add_argument("--output-len", type=int, default=10, dest="output_len")
    p.add_argument("--repeat-count", type=int, default=2, dest="repeat_count")
    p.add_argument("--repeat-mode", choices=REPEAT_MODES, default="random", dest="repeat_mode")
    common.add_offline_args(p)


def run(
    *,
    document_length: int = 20000,
    num_documents: int = 8,
    output_len: int = 10,
    repeat_count: int = 2,
    repeat_mode: str = "random",
    seed: int = 0,
    profile: bool = False,
    profile_dir: str | None = None,
    output_json: str | None = None,
    save_step_log: bool = False,
    disable_tqdm: bool = False,
    llm=None,
    **engine_kwargs,
) -> dict:
    for name, value in (
        ("document_length", document_length),
        ("num_documents", num_documents),
        ("repeat_count", repeat_count),
    ):
        if value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be >= 1")
    from labkit import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len)
    with common.engine(llm, seed, engine_kwargs) as llm:
        rng = np.random.default_rng(seed)
        docs = datasets.random_prompts(
            common.token_space(llm), [document_length] * 2 * num_documents, 0, rng
        )
        warmup, documents = docs[:num_documents], docs[num_documents:]
        llm.generate([{"prompt_token_ids": d} for d in warmup], params, use_tqdm=not disable_tqdm)
        prompts = repeat(documents, repeat_count, repeat_mode, rng)
        return common.generate_benchmark(
            llm,
            "long_doc_qa",
            [{"prompt_token_ids": p} for p in prompts],
            params,
            count_cached_tokens=True,
            profile=profile,
            profile_dir=profile_dir,
            output_json=output_json,
            save_step_log=save_step_log,
            disable_tqdm=disable_tqdm,
        )


def repeat(documents: list, count: int, mode: str, rng: np.random.Generator) -> list:
    if mode == "tile":
        return documents * count
    if mode == "interleave":
        return [d for d in documents for _ in range(count)]
    if mode == "random":
        tiled = documents * count
        return [tiled[i] for i in rng.permutation(len(tiled))]
    raise ValueError(f"repeat_mode={mode!r} is invalid: must be one of {', '.join(REPEAT_MODES)}")
