"""Async scheduling: step n+1 is scheduled and launched before step n's sampled tokens reach the
host. Whatever the timing, outputs must be those of the synchronous engine (greedy tokens against
HF are checked in test_correctness.py's "async" configurations)."""

from __future__ import annotations

import pytest
from helpers import assert_engine_idle, random_prompts

from labkit import LLM, RequestOutputKind, SamplingParams
from labkit.engine.block_manager import BlockManager
from labkit.engine.request import Request
from labkit.engine.scheduler import Scheduler


def _params(i: int) -> SamplingParams:
    """A mix of everything the sampler reads from the host: seeds, penalties, min_tokens, stop
    strings and ids, bad words, logprobs with top-k, n > 1."""
    return SamplingParams(
        temperature=0 if i % 3 == 0 else 0.9,
        top_p=0.9 if i % 2 else 1.0,
        top_k=20 if i % 4 == 1 else -1,
        seed=100 + i,
        max_tokens=6 + 3 * (i % 5),
        min_tokens=2 if i % 5 == 2 else 0,
        presence_penalty=0.4 if i % 2 else 0.0,
        repetition_penalty=1.2 if i % 3 == 1 else 1.0,
        stop_token_ids=[7] if i % 4 == 3 else None,
        stop=["ab"] if i % 6 == 5 else None,
        logprobs=2 if i % 2 else None,
        n=2 if i % 7 == 4 else 1,
    )


def _run(path, async_scheduling: bool, **kw):
    prompts = [
        {"prompt_token_ids": p}
        for p in random_prompts(256, [3, 40, 1, 17, 64, 9, 100, 25, 5, 33, 70, 2], seed=3)
    ]
    with LLM(str(path), dtype="float32", async_scheduling=async_scheduling, **kw) as llm:
        outs = llm.generate(prompts, [_params(i) for i in range(len(prompts))], use_tqdm=False)
        assert_engine_idle(llm)
        log = llm.step_log()
        stats = llm.engine.stats()
        assert len(log) == stats.num_steps
        assert (log.kv_blocks_used + log.kv_blocks_free == stats.kv_blocks_total).all()
    return [
        [
            (
                c.token_ids,
                c.text,
                c.finish_reason,
                c.stop_reason,
                c.cumulative_logprob,
                None if c.logprobs is None else [sorted(e) for e in c.logprobs],
            )
            for c in o.outputs
        ]
        for o in outs
    ], log


@pytest.mark.parametrize(
    "kw",
    [{}, dict(block_size=3, max_num_batched_tokens=48, num_kv_blocks=70)],
    ids=["default", "chunked_preempt"],
)
def test_async_gives_the_synchronous_outputs_for_every_sampling_feature(tiny_ckpts, kw):
    sync, _ = _run(tiny_ckpts["llama"], False, **kw)
    asyn, log = _run(tiny_ckpts["llama"], True, **kw)
    # Everything equal but the cumulative logprobs, which differ by float noise between batch
    # shapes (a rounded comparison would fail wherever the noise crosses a rounding boundary).
    cumulative = 4
    assert [[c[:cumulative] + c[cumulative + 1 :] for c in o] for o in asyn] == [
        [c[:cumulative] + c[cumulative + 1 :] for c in o] for o in sync
    ]
    for a, b in zip(asyn, sync):
        assert all(abs(x[cumulative] - y[cumulative]) < 1e-3 for x, y in zip(a, b))
    if "num_kv_blocks" in kw:
        assert log.num_preemptions.sum() > 0


def test_abort_while_a_step_is_in_flight_frees_every_block(tiny_ckpts):
    with LLM(str(tiny_ckpts["qwen2"]), dtype="float32", async_scheduling=True) as llm:
        e = llm.engine
        sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        for i, p in enumerate(random_prompts(256, [25] * 10, seed=4)):
            e.add_request(f"a{i}", {"prompt_token_ids": p}, sp)
        for _ in range(4):
            e.step()
        assert e._inflight is not None  # a launched step whose tokens are still on the way
        for i in range(0, 10, 2):
            e.abort_request(f"a{i}")
        done = {}
        while e.has_unfinished_requests():
            done |= {o.request_id: o for o in e.step() if o.finished}
        assert set(done) == {f"a{i}" for i in range(1, 10, 2)}
        assert all(len(o.outputs[0].token_ids) == 30 for o in done.values())
        assert_engine_idle(llm)


def test_streamed_deltas_concatenate_to_the_final_text(tiny_ckpts):
    with LLM(str(tiny_ckpts["llama"]), dtype="float32", async_scheduling=True) as llm:
        e = llm.engine
        prompts = random_prompts(256, [5, 12, 30], seed=5)
        for i, p in enumerate(prompts):
            e.add_request(
                f"d{i}",
                {"prompt_token_ids": p},
                SamplingParams(temperature=0, max_tokens=15, output_kind=RequestOutputKind.DELTA),
            )
            e.add_request(
                f"c{i}", {"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=15)
            )
        deltas, finals = {}, {}
        while e.has_unfinished_requests():
            for o in e.step():
                if o.request_id.startswith("d"):
                    deltas[o.request_id] = deltas.get(o.request_id, []) + o.outputs[0].token_ids
                elif o.finished:
                    finals[o.request_id] = o.outputs[0].token_ids
        assert [deltas[f"d{i}"] for i in range(3)] == [finals[f"c{i}"] for i in range(3)]


def test_tp2_async_matches_tp1_sync(tiny_ckpts, tiny_llms):
    prompts = [{"prompt_token_ids": p} for p in random_prompts(256, [1, 9, 33, 60], seed=6)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in tiny_llms("llama").generate(prompts, sp, use_tqdm=False)]
    with LLM(
        str(tiny_ckpts["llama"]), dtype="float32", tensor_parallel_size=2, async_scheduling=True
    ) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == ref


# ---- the scheduler's view of a token in flight --------------------------------------------------


def _running(sched: Scheduler, prompt_len: int, **params) -> Request:
    r = Request("r", "r", 0, None, list(range(prompt_len)), SamplingParams(**params))
    sched.add(r)
    ((got, n),) = sched.schedule().work
    r.num_computed_tokens += n
    r.num_pending = 1  # its first token was sampled on the device
    return r


def test_a_token_in_flight_is_decoded_next_step_without_its_id():
    sched = Scheduler(BlockManager(8, 4), 4, 64, max_model_len=100)
    r = _running(sched, 6, max_tokens=5)
    batch = sched.schedule()
    assert batch.work == [(r, 1)] and batch.num_decode == 1
    assert len(r.block_table) == 2  # room for position 6, the token in flight


def test_a_token_in_flight_that_ends_the_request_is_not_scheduled_again():
    sched = Scheduler(BlockManager(8, 4), 4, 64, max_model_len=100)
    _running(sched, 6, max_tokens=1)
    assert sched.schedule().work == []
    sched = Scheduler(BlockManager(8, 4), 4, 64, max_model_len=7)
    _running(sched, 6, max_tokens=5)
    assert sched.schedule().work == []


def test_a_preempted_request_waits_for_its_token_in_flight():
    sched = Scheduler(BlockManager(8, 4), 4, 64, max_model_len=100)
    r = _running(sched, 6, max_tokens=5)
    sched._preempt(r)
    assert sched.schedule().work == []  # its last token's id is not known yet
    r.token_ids.append(42)
    r.num_pending = 0
    ((got, n),) = sched.schedule().work
    assert got is r and n == 7  # recomputed, the landed token included
