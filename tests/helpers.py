"""Plain helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import math

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


def assert_frequencies_match(ids: torch.Tensor, probs: torch.Tensor, label: str) -> None:
    """Token ids drawn from `probs` ([vocab]): none where the probability is 0, and their counts
    within a chi-square bound at p = 1e-4 (Wilson-Hilferty; tokens expected fewer than 5 times
    pooled, as the test requires)."""
    counts = torch.bincount(ids, minlength=probs.shape[0]).double()
    assert counts[probs == 0].sum() == 0, f"{label} drew a token it cuts"
    expected = probs.double() * ids.numel()
    small = (expected < 5) & (probs > 0)
    obs = torch.cat([counts[expected >= 5], counts[small].sum()[None]])
    exp = torch.cat([expected[expected >= 5], expected[small].sum()[None]])
    keep = exp > 0
    chi2 = (((obs - exp) ** 2) / exp)[keep].sum().item()
    dof = int(keep.sum()) - 1
    bound = dof * (1 - 2 / (9 * dof) + 3.72 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, f"{label}: chi2 {chi2:.1f} on {dof} dof"
