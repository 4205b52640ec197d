"""SamplingParams semantics as vLLM defines them: stop strings and stop tokens, max_tokens and
min_tokens, n, logprobs, seeds, and the text that comes back. Most use the default model: its
text is worth stopping on."""

from __future__ import annotations

import math

import pytest
from helpers import assert_engine_idle, random_prompts

from labkit import LLM, SamplingParams

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


@pytest.fixture(scope="module")
def baseline(default_llm):
    """The greedy continuation that the stop tests cut short."""
    c = default_llm.generate(PROMPT, greedy(max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 24
    return c


def test_max_tokens_ends_with_length(default_llm, baseline):
    c = default_llm.generate(PROMPT, greedy(max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "length" and c.stop_reason is None
    assert c.token_ids == baseline.token_ids[:5]


def test_output_text_is_the_decoded_tokens(default_llm, baseline):
    tok = default_llm.get_tokenizer()
    assert baseline.text == tok.decode(baseline.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", ["answer", ["no such text", "\n\n"]])
def test_stop_string_cuts_text(default_llm, baseline, stop):
    first = stop if isinstance(stop, str) else "\n\n"
    assert first in baseline.text
    c = default_llm.generate(PROMPT, greedy(max_tokens=24, stop=stop), use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == first
    assert c.text == baseline.text[: baseline.text.index(first)]
    # Generation stopped as soon as the string appeared, not at max_tokens.
    assert len(c.token_ids) < len(baseline.token_ids)
    assert c.token_ids == baseline.token_ids[: len(c.token_ids)]
    kept = default_llm.generate(
        PROMPT, greedy(max_tokens=24, stop=stop, include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert kept.text == c.text + first


def _first_new_token(ids: list[int], start: int) -> int:
    """Index of the first token at or after `start` that doesn't occur earlier."""
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i])


def test_stop_token_ids_end_generation(default_llm, baseline):
    i = _first_new_token(baseline.token_ids, 3)
    stop_id = baseline.token_ids[i]
    c = default_llm.generate(
        PROMPT, greedy(max_tokens=24, stop_token_ids=[stop_id]), use_tqdm=False
    )[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == baseline.token_ids[: i + 1]  # the stop token itself is in token_ids


def test_stop_token_text_is_left_out_of_the_text(default_llm, baseline):
    # vLLM (V1 IncrementalDetokenizer.update): a stop token ends the request and, unless
    # include_stop_str_in_output, its text is not part of the output text.
    tok = default_llm.get_tokenizer()
    i = _first_new_token(baseline.token_ids, 3)
    stop_id = baseline.token_ids[i]
    c = default_llm.generate(
        PROMPT, greedy(max_tokens=24, stop_token_ids=[stop_id]), use_tqdm=False
    )[0].outputs[0]
    assert c.text == tok.decode(baseline.token_ids[:i], skip_special_tokens=True)


def test_eos_ends_chat_answer_and_min_tokens_holds_it_off(default_llm):
    eos = default_llm.engine.eos_token_ids
    plain = default_llm.chat(CHAT, greedy(max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert plain.finish_reason == "stop" and plain.token_ids[-1] in eos
    n = len(plain.token_ids)
    held = default_llm.chat(CHAT, greedy(max_tokens=n + 8, min_tokens=n + 4), use_tqdm=False)[
        0
    ].outputs[0]
    assert len(held.token_ids) >= n + 4
    assert not set(held.token_ids[: n + 4]) & eos
    # Only EOS was banned: up to where it came, the answer is unchanged.
    assert held.token_ids[: n - 1] == plain.token_ids[: n - 1]


def test_min_tokens_bans_stop_token_ids_too(default_llm, baseline):
    stop_id = baseline.token_ids[1]
    assert stop_id not in baseline.token_ids[:1]
    c = default_llm.generate(
        PROMPT, greedy(max_tokens=10, stop_token_ids=[stop_id], min_tokens=4), use_tqdm=False
    )[0].outputs[0]
    assert len(c.token_ids) >= 4 and stop_id not in c.token_ids[:4]


def test_n_returns_n_completions(default_llm, baseline):
    g = default_llm.generate(PROMPT, greedy(max_tokens=6, n=2), use_tqdm=False)[0]
    assert [c.index for c in g.outputs] == [0, 1]
    assert all(c.token_ids == baseline.token_ids[:6] for c in g.outputs)
    sp = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, n=2, seed=11)
    s = default_llm.generate(PROMPT, sp, use_tqdm=False)[0]
    assert [c.index for c in s.outputs] == [0, 1]
    assert all(len(c.token_ids) >= 1 and c.finish_reason for c in s.outputs)
    assert s.outputs[0].token_ids != s.outputs[1].token_ids  # two samples, not one copied
    again = default_llm.generate(PROMPT, sp, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in s.outputs]
    assert_engine_idle(default_llm)


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_logprobs_three_gives_top_three_and_the_chosen_token(default_llm, temperature):
    sp = SamplingParams(temperature=temperature, top_p=0.95, max_tokens=6, logprobs=3, seed=3)
    c = default_llm.generate(PROMPT, sp, use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    for tok, pos in zip(c.token_ids, c.logprobs):
        assert len(pos) >= 3 and tok in pos
        top = sorted((lp for lp in pos.values() if lp.rank <= 3), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
        assert all(lp.logprob <= 0 for lp in pos.values())
        chosen = pos[tok]
        if chosen.rank <= 3:
            assert chosen.logprob == top[chosen.rank - 1].logprob
        else:
            assert chosen.logprob <= top[-1].logprob
        if temperature == 0:
            assert pos[tok].rank == 1
    assert math.isclose(
        c.cumulative_logprob,
        sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs)),
        abs_tol=1e-4,
    )
    # The top entries carry their decoded text, as vLLM's Logprob.decoded_token.
    tok = default_llm.get_tokenizer()
    assert all(lp.decoded_token == tok.decode([t]) for t, lp in c.logprobs[0].items())


def test_seeded_request_is_the_same_alone_and_in_a_batch_of_32(default_llm):
    seeded = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=1234)
    prompt = "My favourite colour is"
    alone = default_llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0]
    others = [
        f"Fact number {i}: the best thing about {t} is"
        for i, t in enumerate(["cats", "rain", "maths", "bread"] * 8)
    ]
    unseeded = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8)
    batch = others[:17] + [prompt] + others[17:31]
    params = [unseeded] * 17 + [seeded] + [unseeded] * 14
    assert len(batch) == 32
    outs = default_llm.generate(batch, params, use_tqdm=False)
    assert outs[17].outputs[0].text == alone.text
    assert outs[17].outputs[0].token_ids == alone.token_ids
    # The seed decides the sample: another seed gives another continuation.
    other = default_llm.generate(
        prompt, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=99), use_tqdm=False
    )[0].outputs[0]
    assert other.token_ids != alone.token_ids


def test_prompt_forms_are_equivalent(tiny_llms):
    llm = tiny_llms("llama")
    text = "Hello, my name is"
    ids = llm.get_tokenizer().encode(text)
    sp = greedy(max_tokens=6, ignore_eos=True)
    a, b, c = (
        llm.generate(p, sp, use_tqdm=False)[0] for p in (text, ids, {"prompt_token_ids": ids})
    )
    assert a.prompt == text and b.prompt is None
    assert a.prompt_token_ids == b.prompt_token_ids == c.prompt_token_ids == ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids


def test_max_tokens_none_runs_to_max_model_len(tiny_ckpts):
    with LLM(str(tiny_ckpts["qwen2"]), max_model_len=40) as llm:
        prompt = random_prompts(llm.config.model_config.vocab_size, [11], seed=12)[0]
        c = llm.generate(prompt, greedy(max_tokens=None, ignore_eos=True), use_tqdm=False)[
            0
        ].outputs[0]
        assert c.finish_reason == "length"
        assert len(prompt) + len(c.token_ids) == 40
        assert_engine_idle(llm)
