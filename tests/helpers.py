"""Plain helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from labkit import LLM, SamplingParams

QUICKSTART_PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def greedy_params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0, **kw)


def assert_engine_idle(llm: LLM) -> None:
    """No request is left in the engine and every KV block is back on the free list."""
    assert not llm.engine.has_unfinished_requests()
    stats = llm.engine.stats()
    assert stats.num_unfinished_requests == 0
    assert stats.kv_blocks_used == 0
