"""Engine features: prefix caching, beam search, chat, priorities, penalties and
controls, streaming deltas and aborts."""

from __future__ import annotations

import pytest
import torch

from labkit import LLM, BeamSearchParams, RequestOutputKind, SamplingParams
from labkit.engine.sampler import Sampler, apply_penalties

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _ids(n: int, seed: int, count: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (n,), generator=g).tolist() for _ in range(count)]


def _tok(p: list[int]) -> dict:
    return {"prompt_token_ids": p}


def _all_free(llm: LLM) -> bool:
    return llm.engine.stats().kv_blocks_used == 0 and not llm.engine.has_unfinished_requests()


# ---- prefix caching -----------------------------------------------------------------------


def test_prefix_caching_on_and_off_give_the_same_tokens(tiny_ckpts):
    prompts = [_tok(p) for p in _ids(50, 1, 3) + _ids(23, 2, 3)]
    prompts += prompts[:3]  # repeats: the second copies run from the cache
    with LLM(str(tiny_ckpts["llama"]), enable_prefix_caching=False) as off:
        ref = [o.outputs[0].token_ids for o in off.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(str(tiny_ckpts["llama"]), enable_prefix_caching=True) as on:
        got = [o.outputs[0].token_ids for o in on.generate(prompts, GREEDY, use_tqdm=False)]
        again = [o.outputs[0].token_ids for o in on.generate(prompts, GREEDY, use_tqdm=False)]
        assert on.step_log().prefix_cache_hits.sum() > 0
    assert got == ref and again == ref


def test_shared_prefix_is_reused_and_only_the_rest_is_prefilled(tiny_llms):
    llm = tiny_llms("llama")
    assert llm.reset_prefix_cache()
    base = _ids(180, 3)[0]  # 90% of the second prompt
    first = llm.generate(_tok(base + _ids(20, 4)[0]), GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    n0 = len(llm.step_log())
    second_prompt = base + _ids(20, 5)[0]
    second = llm.generate(_tok(second_prompt), GREEDY, use_tqdm=False)[0]
    steps = llm.step_log().iloc[n0:]
    bs = llm.config.block_size
    assert second.num_cached_tokens == 180 // bs * bs
    assert steps.num_prefill_tokens.sum() == len(second_prompt) - second.num_cached_tokens
    assert steps.prefix_cache_hits.sum() == second.num_cached_tokens
    assert _all_free(llm)


def test_blocks_filled_during_decode_become_reusable(tiny_llms):
    llm = tiny_llms("llama")
    llm.reset_prefix_cache()
    prompt = _ids(20, 6)[0]
    out = llm.generate(
        _tok(prompt), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )[0]
    follow_up = prompt + out.outputs[0].token_ids + [7]
    again = llm.generate(_tok(follow_up), GREEDY, use_tqdm=False)[0]
    bs = llm.config.block_size
    assert again.num_cached_tokens == (len(follow_up) - 1) // bs * bs > len(prompt)


def test_reset_prefix_cache_forgets(tiny_llms):
    llm = tiny_llms("llama")
    p = _tok(_ids(40, 7)[0])
    llm.generate(p, GREEDY, use_tqdm=False)
    assert llm.reset_prefix_cache()
    assert llm.generate(p, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


# ---- beam search --------------------------------------------------------------------------


def test_beam_width_one_is_greedy(tiny_llms):
    llm = tiny_llms("qwen2")
    prompts = [_tok(p) for p in _ids(15, 8, 3)]
    beams = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))
    greedy = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert [b.sequences[0].output_token_ids for b in beams] == [
        g.outputs[0].token_ids for g in greedy
    ]


def test_beam_search_equals_hf_num_beams_4(tiny_ckpts, hf_models, tiny_llms):
    llm, hf = tiny_llms("llama"), hf_models("llama")
    prompts = _ids(3, 9) + _ids(20, 10) + _ids(40, 11) + _ids(17, 12)
    n = 6
    ours = llm.beam_search(
        [_tok(p) for p in prompts], BeamSearchParams(beam_width=4, max_tokens=n, ignore_eos=True)
    )
    for p, o in zip(prompts, ours):
        r = hf.generate(
            torch.tensor([p]),
            num_beams=4,
            num_return_sequences=4,
            max_new_tokens=n,
            do_sample=False,
            early_stopping=True,
            length_penalty=1.0,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        assert [s.output_token_ids for s in o.sequences] == [
            s[len(p) :].tolist() for s in r.sequences
        ]
        ours_scores = [s.cum_logprob / n for s in o.sequences]
        assert ours_scores == pytest.approx(r.sequences_scores.tolist(), abs=1e-4)


def test_beam_search_beats_greedy_on_the_default_model(default_llm):
    prompts = [
        "The capital of France is",
        "My favourite food is",
        "Water boils at",
        "The best way to learn is",
    ]
    beams = default_llm.beam_search(
        prompts, BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    )
    greedy = default_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    for b, g in zip(beams, greedy):
        assert len(b.sequences) == 4
        assert b.sequences[0].cum_logprob >= g.outputs[0].cumulative_logprob - 1e-5
        assert b.sequences[0].text


def test_beams_share_their_prompt_blocks(tiny_llms):
    llm = tiny_llms("llama")
    llm.reset_prefix_cache()
    n0 = len(llm.step_log())
    prompt = _ids(64, 13)[0]
    llm.beam_search([_tok(prompt)], BeamSearchParams(beam_width=4, max_tokens=4, ignore_eos=True))
    steps = llm.step_log().iloc[n0:]
    # One full prefill of the prompt, then each round only the beams' last partial blocks.
    assert steps.num_prefill_tokens.sum() < 2 * len(prompt)
    assert steps.prefix_cache_hits.sum() > 0


# ---- chat -----------------------------------------------------------------------------------


def test_chat_renders_the_tokenizers_template_and_answers_paris(default_llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    tok = default_llm.get_tokenizer()
    out = default_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt == rendered
    assert out.prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    assert "Paris" in out.outputs[0].text


def test_chat_takes_a_list_of_conversations(default_llm):
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Say hello."}],
    ]
    outs = default_llm.chat(convs, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert len(outs) == 2 and "Paris" in outs[0].outputs[0].text


# ---- priorities -----------------------------------------------------------------------------


def test_high_priority_submitted_last_finishes_first(tiny_ckpts):
    # 12 blocks of 8 tokens cannot hold six 30-token prompts generating 20 tokens each.
    with LLM(
        str(tiny_ckpts["llama"]), num_kv_blocks=12, block_size=8, scheduling_policy="priority"
    ) as llm:
        prompts = [_tok(p) for p in _ids(30, 14, 6)]
        outs = llm.generate(
            prompts,
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            priority=[1, 1, 1, 1, 1, 0],
            use_tqdm=False,
        )
        assert all(o.finished and len(o.outputs[0].token_ids) == 20 for o in outs)
        finished = [o.metrics.finished_time for o in outs]
        assert finished[5] <= min(finished[:5])
        assert _all_free(llm)


def test_waiting_high_priority_request_preempts_running_low_priority(tiny_ckpts):
    with LLM(
        str(tiny_ckpts["llama"]), num_kv_blocks=10, block_size=8, scheduling_policy="priority"
    ) as llm:
        e = llm.engine
        sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        for i, p in enumerate(_ids(30, 15, 2)):
            e.add_request(f"low{i}", _tok(p), sp, priority=5)
        for _ in range(3):
            e.step()
        e.add_request("high", _tok(_ids(30, 16)[0]), sp, priority=0)
        order = []
        while e.has_unfinished_requests():
            order += [o.request_id for o in e.step() if o.finished]
        assert order[0] == "high" and sorted(order) == ["high", "low0", "low1"]
        assert e.stats().kv_blocks_used == 0


# ---- penalties and controls ---------------------------------------------------------------


def test_penalty_formulas_on_logits():
    row = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    apply_penalties(
        row, prompt_ids=[0], output_ids=[1, 2, 2], presence=0.5, frequency=0.25, repetition=2.0
    )
    # token 0: prompt only -> 2/2; 1: out once, negative -> -2*2 - 0.25 - 0.5;
    # 2: out twice, positive -> 1/2 - 0.5 - 0.5; 3, 4: unseen
    assert row.tolist() == pytest.approx([1.0, -4.75, -0.5, -1.0, 0.5])


def _sampler_row(params: SamplingParams, prompt, output, logits):
    from labkit.engine.request import Request

    r = Request("r", "r", 0, None, list(prompt), params)
    r.token_ids += list(output)
    return Sampler(0, {4}, torch.device("cpu")).process(logits.clone()[None], [r])[0]


def test_logit_bias_allowed_tokens_and_min_tokens():
    logits = torch.zeros(6)
    out = _sampler_row(SamplingParams(logit_bias={3: 5.0}), [1], [], logits)
    assert out.argmax().item() == 3
    out = _sampler_row(SamplingParams(allowed_token_ids=[2, 5]), [1], [], logits)
    assert torch.isinf(out[[0, 1, 3, 4]]).all() and torch.isfinite(out[[2, 5]]).all()
    out = _sampler_row(SamplingParams(min_tokens=2, stop_token_ids=[1]), [1], [0], logits)
    assert torch.isinf(out[[1, 4]]).all()  # EOS (4) and the stop token banned before min_tokens


def test_penalties_and_controls_change_outputs(tiny_llms):
    llm = tiny_llms("llama")
    p = _tok(_ids(30, 17)[0])
    base = (
        llm.generate(
            p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    pen = (
        llm.generate(
            p,
            SamplingParams(
                temperature=0,
                max_tokens=30,
                ignore_eos=True,
                frequency_penalty=2.0,
                presence_penalty=2.0,
            ),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    assert len(set(pen)) > len(set(base))  # penalties discourage repeats
    rep = (
        llm.generate(
            p,
            SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=5.0),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    assert rep != base
    allowed = (
        llm.generate(
            p, SamplingParams(temperature=0, max_tokens=5, allowed_token_ids=[7, 8]), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    assert set(allowed) <= {7, 8}


def test_bad_words_are_never_generated(default_llm):
    p = "The capital of France is"
    plain = default_llm.generate(p, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert "Paris" in plain.outputs[0].text
    banned = default_llm.generate(
        p, SamplingParams(temperature=0, max_tokens=8, bad_words=["Paris"]), use_tqdm=False
    )[0]
    assert "Paris" not in banned.outputs[0].text


def test_include_stop_str_in_output(default_llm):
    p = "The capital of France is"
    cut = default_llm.generate(
        p, SamplingParams(temperature=0, max_tokens=8, stop=["Paris"]), use_tqdm=False
    )[0].outputs[0]
    kept = default_llm.generate(
        p,
        SamplingParams(
            temperature=0, max_tokens=8, stop=["Paris"], include_stop_str_in_output=True
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert cut.stop_reason == kept.stop_reason == "Paris"
    assert not cut.text.endswith("Paris") and kept.text == cut.text + "Paris"


def test_prompt_logprobs_match_hf(tiny_llms, hf_models):
    llm, hf = tiny_llms("llama"), hf_models("llama")
    prompt = _ids(12, 18)[0]
    out = llm.generate(
        _tok(prompt), SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2), use_tqdm=False
    )[0]
    ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, tok in enumerate(prompt[1:], start=1):
        entry = out.prompt_logprobs[i]
        assert entry[tok].logprob == pytest.approx(ref[i - 1, tok].item(), abs=1e-4)
        assert len(entry) >= 2


# ---- streaming and aborts ---------------------------------------------------------------------


def test_streamed_deltas_concatenate_to_the_final_text(default_llm):
    e = default_llm.engine
    texts = [
        "Write the word café three times:",
        "日本の首都は",
        "Emoji time: 🎉",
        "Ünïcödé test:",
        "The capital of France is",
    ] * 4
    finals: dict[str, str] = {}
    for i, t in enumerate(texts):
        e.add_request(
            f"d{i}",
            t,
            SamplingParams(
                temperature=0, max_tokens=12, output_kind=RequestOutputKind.DELTA, stop=["\n\n"]
            ),
        )
        e.add_request(f"c{i}", t, SamplingParams(temperature=0, max_tokens=12, stop=["\n\n"]))
    deltas: dict[str, str] = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.request_id.startswith("d"):
                deltas[o.request_id] = deltas.get(o.request_id, "") + o.outputs[0].text
            elif o.finished:
                finals[o.request_id] = o.outputs[0].text
    assert len(finals) == 20
    for i in range(20):
        assert deltas[f"d{i}"] == finals[f"c{i}"]
    assert any(ord(c) > 127 for f in finals.values() for c in f)


def test_aborting_half_the_requests_mid_run_frees_every_block(tiny_llms):
    llm = tiny_llms("qwen2")
    e = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(_ids(25, 19, 10)):
        e.add_request(f"a{i}", _tok(p), sp)
    for _ in range(4):
        e.step()
    assert e.stats().kv_blocks_used > 0
    for i in range(0, 10, 2):
        e.abort_request(f"a{i}")
    done = set()
    while e.has_unfinished_requests():
        done |= {o.request_id for o in e.step() if o.finished}
    assert done == {f"a{i}" for i in range(1, 10, 2)}
    assert e.stats().kv_blocks_used == 0
