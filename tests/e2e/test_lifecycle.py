"""Engine life cycle: KV blocks all come back (after generate, aborts and interrupts), TP engines
can be built and closed again and again without leaking processes or memory, request metrics are
ordered, and the step log adds up."""

from __future__ import annotations

import ctypes
import gc
import sys

import psutil
import pytest
import torch
from helpers import assert_engine_idle, greedy_params, random_prompts

from labkit import LLM, SamplingParams

STEP_LOG_COLUMNS = [
    "step",
    "schedule_ms",
    "prepare_ms",
    "forward_ms",
    "sample_ms",
    "postprocess_ms",
    "total_ms",
    "num_prefill_tokens",
    "num_prefill_seqs",
    "num_decode_seqs",
    "num_running",
    "num_waiting",
    "kv_blocks_used",
    "kv_blocks_free",
    "num_preemptions",
]


def _rss_mib() -> float:
    """Resident memory of live objects: freed heap pages that glibc keeps for reuse (how much
    varies with fragmentation from run to run) are handed back first, so what remains is a leak."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss / 2**20


def _children() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_tp2_build_use_close_five_times_leaks_no_processes_or_memory(tiny_ckpts):
    # Other tests' long-lived helpers (a server, say) may be running: count only new ones.
    before = _children()
    threads = torch.get_num_threads()
    path = str(tiny_ckpts["llama"])
    prompts = ["The capital of France is", "Hello, my name is"]

    def use(llm: LLM) -> list[list[int]]:
        assert len(_children() - before) == 1  # the rank-1 worker
        return [
            o.outputs[0].token_ids for o in llm.generate(prompts, greedy_params(8), use_tqdm=False)
        ]

    rss, first = {}, None
    for cycle in range(1, 6):
        # Every way of closing an engine: `with`, shutdown(), and dropping the last reference.
        if cycle % 3 == 1:
            with LLM(path, tensor_parallel_size=2) as llm:
                tokens = use(llm)
        elif cycle % 3 == 2:
            llm = LLM(path, tensor_parallel_size=2)
            tokens = use(llm)
            llm.shutdown()
            with pytest.raises(RuntimeError, match="shut down"):
                llm.generate(prompts, greedy_params(8), use_tqdm=False)
        else:
            llm = LLM(path, tensor_parallel_size=2)
            tokens = use(llm)
        del llm
        assert _children() - before == set(), f"cycle {cycle} left worker processes behind"
        first = first or tokens
        assert tokens == first  # a rebuilt engine computes the same thing
        rss[cycle] = _rss_mib()
        # Rank 0 splits the cores with its worker while it runs; closing gives them back.
        assert torch.get_num_threads() == threads
    print(f"RSS after each TP=2 cycle (MiB): {rss}")
    assert rss[5] - rss[2] < 100, f"resident memory grew from {rss[2]:.0f} to {rss[5]:.0f} MiB"


def test_every_block_is_free_after_generate_and_aborts(tiny_llms):
    llm = tiny_llms("llama")
    eng = llm.engine
    vocab = llm.config.model_config.vocab_size
    long_run = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = random_prompts(vocab, [3, 20, 37, 70], seed=6)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], long_run, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert_engine_idle(llm)

    eng.add_request("a", {"prompt_token_ids": prompts[0]}, long_run)
    two = SamplingParams(n=2, temperature=0.8, max_tokens=40, seed=1)
    eng.add_request("b", {"prompt_token_ids": prompts[1]}, two)
    eng.add_request("c", {"prompt_token_ids": prompts[2]}, long_run)
    for _ in range(3):
        eng.step()
    assert eng.stats().kv_blocks_used > 0
    eng.add_request("waiting", {"prompt_token_ids": prompts[3]}, long_run)
    eng.abort_request("waiting")  # never scheduled
    eng.abort_request("b")  # running, two sequences
    finished = {}
    for _ in range(2):
        finished.update({o.request_id: o for o in eng.step() if o.finished})
    assert not finished and eng.stats().num_unfinished_requests == 2  # "a" and "c"
    eng.abort_request("c")  # while "a" keeps running
    while eng.has_unfinished_requests():
        finished.update({o.request_id: o for o in eng.step() if o.finished})
    assert set(finished) == {"a"}
    assert len(finished["a"].outputs[0].token_ids) == 40
    assert finished["a"].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert_engine_idle(llm)


def test_interrupted_generate_frees_blocks_and_engine_still_works(tiny_llms, monkeypatch):
    llm = tiny_llms("qwen2")
    prompts = random_prompts(llm.config.model_config.vocab_size, [5, 30, 61], seed=7)
    params = greedy_params(20)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    real_step, calls = llm.engine.step, []

    def step_then_interrupt():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as Ctrl-C in a notebook, mid-generation
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.undo()
    assert_engine_idle(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == ref


def test_request_metrics_are_ordered(tiny_llms):
    llm = tiny_llms("llama")
    prompts = random_prompts(llm.config.model_config.vocab_size, [4, 50, 200], seed=8)
    outs = llm.generate(prompts, greedy_params(5), use_tqdm=False)
    for o in outs:
        m = o.metrics
        assert (
            m.arrival_time
            <= m.first_scheduled_time
            <= m.first_token_time
            <= m.last_token_time
            <= m.finished_time
        )
        assert m.time_in_queue == pytest.approx(m.first_scheduled_time - m.arrival_time)


@pytest.mark.parametrize(
    "lengths", [[1, 5, 130], [65]], ids=["one_token_prompt", "one_token_last_chunk"]
)
def test_step_log_columns_and_prefill_token_accounting(tiny_ckpts, lengths):
    # A 1-token prompt, and the 1-token last chunk of a 65-token prompt under a 64-token
    # budget, are prefills (they yield a request's first token), not decodes.
    max_tokens = 4
    with LLM(str(tiny_ckpts["llama"]), max_num_batched_tokens=64) as llm:
        prompts = random_prompts(llm.config.model_config.vocab_size, lengths, seed=9)
        outs = llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)
        log = llm.step_log()
        num_blocks = llm.engine.stats().kv_blocks_total
    assert set(STEP_LOG_COLUMNS) <= set(log.columns)
    assert log.step.tolist() == list(range(len(log)))
    assert (log[[c for c in STEP_LOG_COLUMNS if c.endswith("_ms")]] >= 0).all().all()
    assert (log.total_ms >= log.forward_ms).all()
    assert ((log.kv_blocks_used + log.kv_blocks_free) == num_blocks).all()
    assert (log.num_prefill_tokens + log.num_decode_seqs <= 64).all()
    assert log.num_preemptions.sum() == 0
    shown = log[["num_prefill_tokens", "num_prefill_seqs", "num_decode_seqs"]].to_string()
    computed = sum(len(p) - o.num_cached_tokens for p, o in zip(prompts, outs))
    assert log.num_prefill_tokens.sum() == computed, shown
    # Each request's first token comes from its prefill; the other max_tokens - 1 from decodes.
    assert log.num_decode_seqs.sum() == len(prompts) * (max_tokens - 1), shown
