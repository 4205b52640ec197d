"""Greedy outputs equal HF transformers' generate(), token for token, with logprobs within 1e-4,
under every KV-cache layout and scheduling path: odd block sizes, chunked prefill, preemption."""

from __future__ import annotations

import math

import pytest
from helpers import assert_engine_idle, greedy_params, random_prompts

from labkit import LLM, SamplingParams

# 16 prompt lengths from 1 to 300. None is a multiple of 7 (so with block_size=7 every prompt
# ends inside a block); 16/17 and 64/65 straddle the edges of 16-token blocks and 64-token chunks.
TINY_LENGTHS = [1, 2, 3, 5, 9, 15, 16, 17, 31, 33, 64, 65, 100, 127, 200, 300]
TINY_MAX_TOKENS = 12
# The 135M default model costs far more per token than the tiny ones: mostly short prompts.
DEFAULT_LENGTHS = [1, 2, 3, 4, 5, 6, 8, 10, 13, 17, 24, 33, 48, 65, 100, 300]
DEFAULT_MAX_TOKENS = 6
LOGPROB_ATOL = 1e-4
# Every tiny checkpoint (data/make_tiny_checkpoints.py): mistral's 16-token sliding window is
# shorter than most prompts, as is mixtral's 48-token one.
TINY_KINDS = ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "mistral"]


def test_prompt_lengths_are_what_the_configs_rely_on():
    for lengths in (TINY_LENGTHS, DEFAULT_LENGTHS):
        assert len(lengths) >= 16 and min(lengths) == 1 and max(lengths) == 300
        assert all(n % 7 for n in lengths), "block_size=7 must divide none of the prompt lengths"


def preemption_blocks(lengths: list[int], max_tokens: int, block_size: int) -> int:
    """A KV cache that holds about a third of what the whole batch needs at its end, and never
    less than the largest single request (which must always fit on its own)."""
    need = [math.ceil((n + max_tokens) / block_size) for n in lengths]
    blocks = max(max(need) + 1, sum(need) // 3)
    assert blocks < sum(need) / 2
    return blocks


def compare_with_hf(llm: LLM, prompts, refs, max_tokens: int) -> None:
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], greedy_params(max_tokens), use_tqdm=False
    )
    assert len(outs) == len(prompts)
    problems = []
    for p, out, (ref_ids, ref_lps) in zip(prompts, outs, refs):
        c = out.outputs[0]
        assert out.prompt_token_ids == p
        assert c.finish_reason == "length"
        if c.token_ids != ref_ids:
            problems.append(f"len {len(p)}: tokens {c.token_ids} != HF {ref_ids}")
            continue
        ours = [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)]
        diff = max(abs(a - b) for a, b in zip(ours, ref_lps))
        if diff > LOGPROB_ATOL:
            problems.append(f"len {len(p)}: logprobs differ by {diff:.2e}")
        assert math.isclose(c.cumulative_logprob, sum(ours), abs_tol=1e-3)
    assert not problems, "\n".join(problems)
    # Every request finished: its KV blocks must all be back.
    assert_engine_idle(llm)


TINY_CONFIGS = {
    "block1": dict(block_size=1),
    "block16": dict(block_size=16),
    "block7": dict(block_size=7),
    "chunked64": dict(max_num_batched_tokens=64),
    "preempt": dict(num_kv_blocks=preemption_blocks(TINY_LENGTHS, TINY_MAX_TOKENS, 16)),
    "block7_chunked_preempt": dict(
        block_size=7,
        max_num_batched_tokens=64,
        num_kv_blocks=preemption_blocks(TINY_LENGTHS, TINY_MAX_TOKENS, 7),
    ),
    # Async scheduling (step n+1 scheduled while step n runs; inputs taken from the device):
    # the same tokens, also when chunks, odd blocks and preemption meet tokens in flight.
    "async": dict(async_scheduling=True),
    "async_block7_chunked_preempt": dict(
        async_scheduling=True,
        block_size=7,
        max_num_batched_tokens=64,
        num_kv_blocks=preemption_blocks(TINY_LENGTHS, TINY_MAX_TOKENS, 7),
    ),
    # With prefix caching a preempted request mostly finds its own blocks again; without it,
    # preemption means a true recompute of prompt and output so far.
    "preempt_no_prefix_cache": dict(
        enable_prefix_caching=False,
        num_kv_blocks=preemption_blocks(TINY_LENGTHS, TINY_MAX_TOKENS, 16),
    ),
}


@pytest.mark.parametrize("config", list(TINY_CONFIGS))
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_greedy_matches_hf(kind, config, tiny_ckpts, hf_models, hf_reference):
    kwargs = TINY_CONFIGS[config]
    prompts = random_prompts(hf_models(kind).config.vocab_size, TINY_LENGTHS, seed=1)
    refs = hf_reference(kind, prompts, TINY_MAX_TOKENS)
    with LLM(str(tiny_ckpts[kind]), dtype="float32", **kwargs) as llm:
        compare_with_hf(llm, prompts, refs, TINY_MAX_TOKENS)
        log = llm.step_log()
        if "max_num_batched_tokens" in kwargs:
            # The prefill really was split: no step computed more than the budget.
            assert (log.num_prefill_tokens + log.num_decode_seqs).max() <= 64
            assert (log.num_prefill_tokens > 0).sum() >= math.ceil(sum(TINY_LENGTHS) / 64)
        if "num_kv_blocks" in kwargs:
            assert log.num_preemptions.sum() > 0, "the small KV cache was meant to force preemption"
        else:
            assert log.num_preemptions.sum() == 0


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_rerun_from_prefix_cache_matches_hf(kind, tiny_ckpts, hf_models, hf_reference):
    prompts = random_prompts(hf_models(kind).config.vocab_size, TINY_LENGTHS, seed=1)
    refs = hf_reference(kind, prompts, TINY_MAX_TOKENS)
    with LLM(str(tiny_ckpts[kind]), dtype="float32", block_size=7) as llm:
        compare_with_hf(llm, prompts, refs, TINY_MAX_TOKENS)
        first_run = len(llm.step_log())
        # The same prompts again: their full blocks now come from the prefix cache.
        compare_with_hf(llm, prompts, refs, TINY_MAX_TOKENS)
        assert llm.step_log().prefix_cache_hits.iloc[first_run:].sum() >= sum(
            (n - 1) // 7 * 7 for n in TINY_LENGTHS
        )


@pytest.mark.slow
def test_default_model_greedy_matches_hf(default_llm, hf_models, hf_reference):
    prompts = random_prompts(hf_models("default").config.vocab_size, DEFAULT_LENGTHS, seed=2)
    refs = hf_reference("default", prompts, DEFAULT_MAX_TOKENS)
    compare_with_hf(default_llm, prompts, refs, DEFAULT_MAX_TOKENS)


@pytest.mark.slow
def test_default_model_matches_hf_with_odd_blocks_chunking_and_preemption(hf_models, hf_reference):
    prompts = random_prompts(hf_models("default").config.vocab_size, DEFAULT_LENGTHS, seed=2)
    # The longest prompt first: while its prefill grows chunk by chunk, the short ones are
    # admitted behind it and the cache runs out.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    prompts = [prompts[i] for i in order]
    refs = hf_reference("default", prompts, DEFAULT_MAX_TOKENS)
    blocks = preemption_blocks(DEFAULT_LENGTHS, DEFAULT_MAX_TOKENS, 7)
    with LLM(dtype="float32", block_size=7, max_num_batched_tokens=64, num_kv_blocks=blocks) as llm:
        compare_with_hf(llm, prompts, refs, DEFAULT_MAX_TOKENS)
        log = llm.step_log()
        assert log.num_preemptions.sum() > 0
        assert (log.num_prefill_tokens + log.num_decode_seqs).max() <= 64


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(default_llm):
    greedy = SamplingParams(temperature=0, max_tokens=24)
    out = default_llm.generate("The capital of France is", greedy, use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    chat = default_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], greedy, use_tqdm=False
    )[0]
    assert "Paris" in chat.outputs[0].text
    assert_engine_idle(default_llm)
