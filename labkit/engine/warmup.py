"""Start-up warm-up: a script of requests with random prompt ids that the engine runs through its
own step loop (scheduler, model runner, sampler, output processing) before the first user
request, so that what a run compiles or loads on first use happens at start-up: Triton kernel
variants (the decode matmuls' and MoE kernels' row-count buckets, eager decode attention with
and without KV splits), cuBLAS kernels for prefill shapes, the torch kernels CUDA loads lazily
(the sampler's sort, softmax, cumsum, inverse-CDF draw, top-k for logprobs, penalties), and the
caching allocators' device and pinned memory for a full-budget step.

The script, phase after phase (each runs until the engine is idle):
- a prefill ladder: one step each of 1, 2, 3, 4, 8, 16, 17, 32, ... tokens up to the full token
  budget;
- a mixed phase: a longer prompt; while it decodes, max_num_seqs - 1 short prompts of odd and
  even lengths join (a mixed step with a long-context decode row); while those decode, two more
  join (a mixed step with short-context rows). They cycle through the sampling variants, and
  the last sixteen end one per step, so the decode batch shrinks to a single row.

This module only drives the engine (through `Driven`); the engine starts fresh afterwards
(`LLMEngine.warm_up`).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Protocol

from labkit.engine.resolved_config import ResolvedConfig
from labkit.engine.stats import EngineStats
from labkit.observe.step_log import StepRecord
from labkit.outputs import RequestOutput
from labkit.sampling_params import RequestOutputKind, SamplingParams

log = logging.getLogger("labkit")

# Longer than a KV split's minimum (kernels/paged_attention_decode.py): an eager decode row over
# this prompt is split, one over a short prompt is not.
LONG_PROMPT = 513
SHORT_PROMPTS = (1, 2, 3, 5, 15, 16, 17, 31, 33, 63, 64, 65, 100)
TAIL = 16  # requests that end one per step, taking the decode batch from 16 rows down to 1
MAX_TOKENS = 4 + TAIL  # the longest output in the script


class Driven(Protocol):
    """What the warm-up needs of an engine."""

    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None) -> str: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def step_records(self, since: int = 0) -> list[StepRecord]: ...

    def stats(self) -> EngineStats: ...


@dataclass(frozen=True)
class Wave:
    at_step: int  # added before this step of its phase
    prompts: list[tuple[int, SamplingParams]]  # (prompt length, params)


@dataclass(frozen=True)
class WarmupSummary:
    seconds: float
    steps: list[StepRecord]

    def describe(self) -> str:
        prefill = [s.num_prefill_tokens for s in self.steps if s.num_prefill_tokens]
        decode = [s.num_decode_seqs for s in self.steps if not s.num_prefill_tokens]
        mixed = sum(1 for s in self.steps if s.num_prefill_tokens and s.num_decode_seqs)
        return (
            f"warm-up: {len(self.steps)} steps (prefills of {min(prefill, default=0)} to "
            f"{max(prefill, default=0)} tokens, {mixed} mixed prefill+decode, {len(decode)} "
            f"decode of {min(decode, default=0)} to {max(decode, default=0)} rows; greedy, "
            "top-p/top-k/min-p, seeded, penalties, logprobs) compiled and loaded what runs use, "
            f"in {self.seconds:.1f} s"
        )


def script(config: ResolvedConfig, num_kv_blocks: int) -> list[list[Wave]]:
    """The phases, each a list of waves, within the engine's limits: no prompt longer than the
    model and the KV cache take with room for its output."""
    kv_tokens = num_kv_blocks * config.block_size
    cap = max(1, min(config.max_model_len, kv_tokens) - 1 - MAX_TOKENS)
    budget = config.max_num_batched_tokens
    # A KV cache smaller than the budget never runs a full-budget step: half of it is the top.
    top = max(1, min(budget, kv_tokens // 2))
    sizes = sorted({1, 2, 3, 4, 17, top} | {1 << k for k in range(top.bit_length())})
    sizes = [n for n in sizes if n <= top]
    ladder = []
    for i, n in enumerate(sizes):
        # All-greedy and all-sampled batches take different paths through the sampler.
        p = _params({"temperature": 0} if i % 2 else {"temperature": 0.8, "top_p": 0.95}, 1)
        ladder.append([Wave(0, [(cap, p)] * (n // cap) + ([(n % cap, p)] if n % cap else []))])
    vocab, most = config.model_config.vocab_size, config.max_logprobs
    logprobs = min(20, vocab if most == -1 else most)
    variants = _variants(logprobs)
    # As many as run at once (a short request holds a few KV blocks), so the batch is full.
    wide = max(TAIL, min(config.max_num_seqs - 1, num_kv_blocks // 4))
    joining = [
        (
            min(cap, SHORT_PROMPTS[i % len(SHORT_PROMPTS)]),
            _params(variants[i % len(variants)], 4 + max(0, i - (wide - TAIL) + 1), i),
        )
        for i in range(wide)
    ]
    late = [
        (min(cap, 7), _params({"temperature": 0.8, "prompt_logprobs": min(1, logprobs)}, 2)),
        (min(cap, 33), _params({"temperature": 0}, 2)),
    ]
    long = min(cap, LONG_PROMPT)
    decoding = -(-long // budget)  # the step in which the long prompt's first decode runs
    mixed = [
        Wave(0, [(long, _params({"temperature": 0}, 2))]),
        Wave(decoding, joining),
        Wave(decoding + 2, late),
    ]
    return ladder + [mixed]


def _variants(logprobs: int) -> list[dict]:
    """Every sampling path: greedy, temperature with each truncation, seeded, penalties and
    logit bias, chosen-token ranks and top-`logprobs` logprobs."""
    return [
        {"temperature": 0},
        {"temperature": 0.8, "top_p": 0.95},
        {"temperature": 1.0, "top_k": 20},
        {"temperature": 0.7, "min_p": 0.05},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "min_p": 0.01, "seed": 0},
        {"temperature": 0, "logprobs": logprobs},
        {"temperature": 0.8, "logprobs": 0},
        {
            "temperature": 0.8,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "logit_bias": {0: 1.0},
        },
    ]


def _params(variant: dict, max_tokens: int, i: int = 0) -> SamplingParams:
    """`variant` with exactly `max_tokens` outputs; request i of a seeded variant gets seed + i."""
    if "seed" in variant:
        variant = {**variant, "seed": variant["seed"] + i}
    return SamplingParams(
        **variant,
        max_tokens=max_tokens,
        ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def warm_up(engine: Driven, phases: list[list[Wave]], vocab_size: int) -> WarmupSummary:
    """Run `phases` through `engine`, each until the engine is idle. Prompt ids come from a
    generator of this call's own: no random state outside it is drawn from."""
    log.info("warm-up: running prefill, mixed and decode steps and the sampler's variants")
    start, first = time.perf_counter(), engine.stats().num_steps
    rng = random.Random(0)
    count = 0
    for phase in phases:
        waves = sorted(phase, key=lambda w: w.at_step)
        step = 0
        while waves or engine.has_unfinished_requests():
            while waves and waves[0].at_step <= step:
                for n, params in waves.pop(0).prompts:
                    ids = [rng.randrange(vocab_size) for _ in range(n)]
                    engine.add_request(f"warmup-{count}", {"prompt_token_ids": ids}, params)
                    count += 1
            engine.step()
            step += 1
    summary = WarmupSummary(time.perf_counter() - start, engine.step_records(first))
    log.info(summary.describe())
    return summary
