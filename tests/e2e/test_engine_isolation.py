"""One request's failure stays that request's: an exception while the engine processes one
request (its text, its logprobs) ends that request with finish_reason "error" and the others run
on unchanged; a step that fails as a whole ends that step's requests and the engine serves on.
Faults are injected where they would arise (a request's detokenizer, the model runner)."""

from __future__ import annotations

import pytest
from helpers import assert_engine_idle, greedy_params, random_prompts

from labkit import LLM, SamplingParams


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async_scheduling"])
def llm(tiny_ckpts, request):
    with LLM(str(tiny_ckpts["llama"]), num_kv_blocks=64, async_scheduling=request.param) as llm:
        yield llm


class _ExplodingDetokenizer:
    def step(self, token_id: int) -> str:
        raise MemoryError("no memory for this request's text")


def _run(llm: LLM, ids: list[str]) -> dict:
    done = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out
    assert set(done) == set(ids)
    return done


def test_a_failing_request_ends_alone(llm):
    prompts = random_prompts(llm.config.model_config.vocab_size, [5, 9, 7], seed=3)
    alone = [
        o.outputs[0].token_ids for o in llm.generate(prompts, greedy_params(8), use_tqdm=False)
    ]
    eng = llm.engine
    for k, p in enumerate(prompts):
        eng.add_request(f"r{k}", p, greedy_params(8))
    eng.output_processor.requests["r1"][0].detokenizer = _ExplodingDetokenizer()
    done = _run(llm, ["r0", "r1", "r2"])
    bad = done["r1"]
    assert bad.outputs[0].finish_reason == "error"
    assert bad.error == "MemoryError: no memory for this request's text"
    assert [done[f"r{k}"].outputs[0].token_ids for k in (0, 2)] == [alone[0], alone[2]]
    assert all(done[f"r{k}"].error is None for k in (0, 2))
    assert_engine_idle(llm)
    # The engine serves on, with the same results.
    again = [
        o.outputs[0].token_ids for o in llm.generate(prompts, greedy_params(8), use_tqdm=False)
    ]
    assert again == alone


def test_a_failing_step_ends_its_requests_and_the_engine_serves_on(llm, monkeypatch):
    prompts = random_prompts(llm.config.model_config.vocab_size, [6, 4], seed=4)
    alone = [
        o.outputs[0].token_ids for o in llm.generate(prompts, greedy_params(6), use_tqdm=False)
    ]
    runner = llm.engine.runner
    execute = runner.execute
    calls = {"n": 0}

    def fails_on_the_third_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("activations do not fit")
        return execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", fails_on_the_third_call)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error", "error"]
    assert all(o.error == "MemoryError: activations do not fit" for o in outs)
    assert_engine_idle(llm)
    monkeypatch.setattr(runner, "execute", execute)
    again = [
        o.outputs[0].token_ids for o in llm.generate(prompts, greedy_params(6), use_tqdm=False)
    ]
    assert again == alone
