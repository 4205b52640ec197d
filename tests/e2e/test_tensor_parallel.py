"""Tensor parallelism on the CPU: TP=2 reproduces TP=1 token for token, the quickstart runs with
TP=1 and TP=2 (also as an unguarded script), and models whose heads don't split are refused."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import psutil
import pytest
from helpers import QUICKSTART_PROMPTS, greedy_params, random_prompts

from labkit import LLM, SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

QUICKSTART_PARAMS = dict(temperature=0.8, top_p=0.95)


@pytest.fixture(scope="module")
def tp2_llama(tiny_ckpts):
    # Shared by this module's tests, and closed at its end: no worker outlives the module.
    with LLM(str(tiny_ckpts["llama"]), dtype="float32", tensor_parallel_size=2) as llm:
        yield llm


def _tokens_and_logprobs(llm: LLM, prompts, max_tokens: int):
    outs = llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)
    return (
        [o.outputs[0].token_ids for o in outs],
        [
            [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
            for o in outs
        ],
    )


def _assert_same(tp1, tp2):
    (ids1, lps1), (ids2, lps2) = tp1, tp2
    assert ids2 == ids1
    # The all-reduce sums partial products in another order: equal up to float32 rounding.
    worst = max(abs(a - b) for r1, r2 in zip(lps1, lps2) for a, b in zip(r1, r2))
    assert worst < 1e-4


def test_tp2_matches_tp1_llama(tp2_llama, tiny_llms):
    vocab = tp2_llama.config.model_config.vocab_size
    prompts = QUICKSTART_PROMPTS + random_prompts(vocab, [1, 9, 40, 150], seed=4)
    _assert_same(
        _tokens_and_logprobs(tiny_llms("llama"), prompts, 10),
        _tokens_and_logprobs(tp2_llama, prompts, 10),
    )


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe", "mixtral", "mistral"])
def test_tp2_matches_tp1_with_chunks_and_odd_blocks(kind, tiny_ckpts):
    # Qwen2 adds q/k/v biases (column-parallel: each rank must keep its slice) and a tied,
    # vocab-sharded LM head; Qwen3 its per-head q/k norms (whole on every rank); the MoE
    # families experts sliced along their intermediate dimension, a replicated router and one
    # all-reduce per layer; mistral (and mixtral) a sliding window. Chunked prefill and 7-token
    # blocks run through the workers too.
    kwargs = dict(dtype="float32", block_size=7, max_num_batched_tokens=48)
    path = str(tiny_ckpts[kind])
    with LLM(path, **kwargs) as tp1:
        prompts = QUICKSTART_PROMPTS + random_prompts(
            tp1.config.model_config.vocab_size, [1, 9, 40, 150], seed=5
        )
        ref = _tokens_and_logprobs(tp1, prompts, 10)
    with LLM(path, tensor_parallel_size=2, **kwargs) as tp2:
        _assert_same(ref, _tokens_and_logprobs(tp2, prompts, 10))
        assert (tp2.step_log().num_prefill_tokens > 0).sum() >= 4  # 150 tokens in 48-token chunks


def test_quickstart_tp2_on_tiny_checkpoint(tp2_llama):
    outs = tp2_llama.generate(
        QUICKSTART_PROMPTS, SamplingParams(**QUICKSTART_PARAMS), use_tqdm=False
    )
    assert [o.prompt for o in outs] == QUICKSTART_PROMPTS
    for o in outs:
        assert o.finished and o.outputs[0].text
        assert 1 <= len(o.outputs[0].token_ids) <= 16  # SamplingParams' default max_tokens
    assert tp2_llama.engine.stats().kv_blocks_used == 0


def test_quickstart_tp1_on_default_model(default_llm):
    outs = default_llm.generate(
        QUICKSTART_PROMPTS, SamplingParams(**QUICKSTART_PARAMS), use_tqdm=False
    )
    assert [o.prompt for o in outs] == QUICKSTART_PROMPTS
    for o in outs:
        assert o.finished and o.outputs[0].text.strip()


def test_default_model_refuses_tp2_before_starting_workers():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # SmolLM2-135M has 9 query and 3 KV heads: two ranks cannot split them.
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tensor_parallel_size=2)
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before


QUICKSTART_SCRIPT = """\
from labkit import LLM, SamplingParams

prompts = {prompts!r}
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
llm = LLM(model={model!r}, tensor_parallel_size=2)
print("WORKERS", *[p.pid for p in llm.engine.workers.procs])
outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    print(f"Prompt: {{output.prompt!r}}, Generated text: {{output.outputs[0].text!r}}")
"""


def test_quickstart_as_unguarded_script_with_tp2(tiny_ckpts, tmp_path):
    # No `if __name__ == "__main__":` guard: multiprocessing's spawn would re-run the whole
    # script in each worker (printing twice, or recursing); the workers must not.
    script = tmp_path / "quickstart.py"
    script.write_text(
        QUICKSTART_SCRIPT.format(prompts=QUICKSTART_PROMPTS, model=str(tiny_ckpts["llama"]))
    )
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("Prompt: ") for line in lines) == len(QUICKSTART_PROMPTS), r.stdout
    for p in QUICKSTART_PROMPTS:
        assert any(line.startswith(f"Prompt: {p!r}, Generated text: ") for line in lines)
    assert sum(line.startswith("WORKERS") for line in lines) == 1
    # The script exits without shutdown(): its worker must still go away with it.
    workers = [int(x) for x in next(l for l in lines if l.startswith("WORKERS")).split()[1:]]
    assert len(workers) == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "a TP worker outlived its script"


def _alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and "labkit.engine.tp_worker" in " ".join(
            p.cmdline()
        )
    except psutil.Error:
        return False


def test_tp2_constrained_output_matches_tp1(tp2_llama, tiny_llms):
    # Only rank 0 samples, so only rank 0 masks: the ranks must still agree step by step.
    regex = r"[a-z]{2,6}( [a-z]{2,6}){2}\."
    params = [
        SamplingParams(temperature=0, max_tokens=24, structured_outputs=so)
        for so in (
            StructuredOutputsParams(regex=regex),
            StructuredOutputsParams(choice=["alpha", "beta", "gamma"]),
        )
    ]
    prompts = QUICKSTART_PROMPTS[:2]
    tp1, tp2 = (
        [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        for llm in (tiny_llms("llama"), tp2_llama)
    )
    assert [c.token_ids for c in tp2] == [c.token_ids for c in tp1]
    assert re.fullmatch(regex, tp2[0].text) and tp2[1].text in ("alpha", "beta", "gamma")
