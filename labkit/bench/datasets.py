"""Benchmark workloads: vLLM's random and ShareGPT datasets, built as token ids.

vLLM's random dataset decodes its token ids to text and the server or engine re-encodes them, so
prompts drift from the requested length (a problem its users keep reporting). Here every prompt
stays a list of token ids end to end: a prompt asked to be L tokens long is L tokens long.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASET_NAMES = ("random", "sharegpt")


@dataclass
class SampleRequest:
    prompt_token_ids: list[int]
    expected_output_len: int
    prompt: str | None = None  # the text, for datasets that have one (ShareGPT)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def engine_prompt(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids}


def token_space(vocab_size: int, tokenizer=None) -> np.ndarray:
    """The ids a random prompt may use: the model's vocabulary less the tokenizer's special
    tokens (a stray BOS or EOS mid-prompt changes what the model does) and less any ids past the
    tokenizer's end (Qwen pads its embedding table beyond the tokenizer)."""
    size = vocab_size if tokenizer is None else min(vocab_size, len(tokenizer))
    ids = np.arange(size)
    if tokenizer is not None:
        ids = np.setdiff1d(ids, tokenizer.all_special_ids)
    return ids


def random_requests(
    space: np.ndarray,
    num_requests: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[SampleRequest]:
    """vLLM's RandomDataset: per request, input and output lengths drawn uniformly from
    [L(1-r), L(1+r)]; the prompt is `prefix_len` + its input length tokens (random_prompts).
    Reproducible from `seed`."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"random_range_ratio={range_ratio!r} is invalid: must be in [0, 1)")
    for name, value in (
        ("input_len", input_len),
        ("output_len", output_len),
        ("num_prompts", num_requests),
    ):
        if value is None or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: the random dataset needs it >= 1")
    if prefix_len < 0:
        raise ValueError(f"prefix_len={prefix_len!r} is invalid: must be >= 0")
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(
        _low(input_len, range_ratio), int(input_len * (1 + range_ratio)) + 1, size=num_requests
    )
    output_lens = rng.integers(
        _low(output_len, range_ratio), int(output_len * (1 + range_ratio)) + 1, size=num_requests
    )
    return [
        SampleRequest(ids, int(out))
        for ids, out in zip(random_prompts(space, input_lens, prefix_len, rng), output_lens)
    ]


def random_prompts(
    space: np.ndarray, lengths, prefix_len: int, rng: np.random.Generator
) -> list[list[int]]:
    """One prompt per length: a shared random prefix of `prefix_len` ids, then
    `space[(offset + i + arange(length)) % len(space)]` with a random offset per prompt (so
    prompts almost surely part ways right after the prefix)."""
    offsets = rng.integers(0, len(space), size=len(lengths))
    prefix = rng.choice(space, size=prefix_len).tolist()
    return [
        prefix + space[(offsets[i] + i + np.arange(length)) % len(space)].tolist()
        for i, length in enumerate(lengths)
    ]


def _low(length: int, ratio: float) -> int:
    return max(1, int(length * (1 - ratio)))


def sharegpt_requests(
    path: str | Path, tokenizer, num_requests: int, output_len: int | None = None, seed: int = 0
) -> list[SampleRequest]:
    """vLLM's ShareGPT sampling: each conversation's first turn is the prompt and its second
    turn's length the output length (unless `output_len` fixes it); conversations are shuffled
    with `seed`, and those too short (< 4 tokens) or too long (prompt > 1024, total > 2048) are
    skipped, as vLLM does."""
    data = json.loads(Path(path).read_text())
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    requests: list[SampleRequest] = []
    for conv in convs:
        if len(requests) == num_requests:
            break
        prompt = conv[0]["value"]
        ids = tokenizer(prompt).input_ids
        out_len = output_len or len(tokenizer(conv[1]["value"]).input_ids)
        if len(ids) < 4 or (output_len is None and out_len < 4):
            continue
        if len(ids) > 1024 or len(ids) + out_len > 2048:
            continue
        requests.append(SampleRequest(ids, out_len, prompt))
    if len(requests) < num_requests:
        raise ValueError(
            f"dataset_path: {path} has only {len(requests)} usable conversations "
            f"for num_prompts={num_requests}"
        )
    return requests


def load(
    dataset_name: str,
    *,
    vocab_size: int,
    tokenizer,
    num_prompts: int,
    input_len: int | None,
    output_len: int | None,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    dataset_path: str | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """The workload a benchmark's --dataset-name and friends ask for."""
    if dataset_name == "random":
        return random_requests(
            token_space(vocab_size, tokenizer),
            num_prompts,
            input_len,
            output_len,
            range_ratio,
            prefix_len,
            seed,
        )
    if dataset_name == "sharegpt":
        if dataset_path is None:
            raise ValueError(
                "dataset_path: the sharegpt dataset needs --dataset-path "
                "(a ShareGPT JSON file; labkit downloads nothing)"
            )
        return sharegpt_requests(dataset_path, tokenizer, num_prompts, output_len, seed)
    raise ValueError(
        f"dataset_name={dataset_name!r} is invalid: must be one of {', '.join(DATASET_NAMES)}"
    )
