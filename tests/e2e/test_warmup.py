"""The start-up warm-up (labkit/engine/warmup.py), run explicitly on the CPU (start-up runs it on
CUDA only): it drives every kind of step and leaves the engine as if it had never run."""

from __future__ import annotations

import logging

import pytest
from helpers import assert_engine_idle, random_prompts

from labkit import LLM, SamplingParams

# Small limits keep the script short on two CPU cores.
LIMITS = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def llm(tiny_ckpts):
    with LLM(str(tiny_ckpts["qwen2"]), **LIMITS) as llm:
        yield llm


def _run(llm: LLM) -> list[tuple[list[int], list]]:
    vocab = llm.config.model_config.vocab_size
    prompts = [{"prompt_token_ids": p} for p in random_prompts(vocab, [5, 40, 17, 90])]
    params = [
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=30, max_tokens=8, ignore_eos=True),  # unseeded
        SamplingParams(temperature=0.8, min_p=0.02, max_tokens=8, ignore_eos=True),
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def test_warm_up_covers_every_kind_of_step_and_leaves_no_trace(llm):
    before = _run(llm)  # this engine has not warmed up
    steps = llm.engine.warm_up().steps
    config = llm.engine.config
    assert max(s.num_prefill_tokens for s in steps) == config.max_num_batched_tokens
    assert {1, 2, 3, 17} <= {s.num_prefill_tokens for s in steps if not s.num_decode_seqs}
    assert sum(1 for s in steps if s.num_prefill_tokens and s.num_decode_seqs) >= 2
    decode_rows = [s.num_decode_seqs for s in steps if not s.num_prefill_tokens]
    assert max(decode_rows) == config.max_num_seqs and {1, 2, 3, 4} <= set(decode_rows)

    assert_engine_idle(llm)
    stats = llm.engine.stats()
    assert stats.num_steps == 0 and stats.last_step is None and llm.step_log().empty
    bm = llm.engine.block_manager
    assert list(bm.free_queue) == list(range(bm.num_blocks)) and not bm.cached
    # Greedy, seeded and unseeded sampling (the engine's generator is back at its seed) alike.
    assert _run(llm) == before


def test_cpu_start_up_does_not_warm_up(tiny_ckpts, caplog):
    with caplog.at_level(logging.INFO, logger="labkit"):
        with LLM(str(tiny_ckpts["qwen2"]), **LIMITS):
            pass
    assert "LLM() started in" in caplog.text and "warm-up" not in caplog.text
