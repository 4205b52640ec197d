"""Beam search over the engine, the way vLLM's LLM.beam_search does it: each round, every live
beam is a one-token request asking for its top 2*beam_width logprobs; the best beam_width
continuations survive. Beams of one prompt share their prompt's KV blocks through the prefix
cache, so a round recomputes only each beam's last, partial block."""

from __future__ import annotations

from dataclasses import dataclass, field

from labkit.outputs import RequestOutput
from labkit.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated, as vLLM
    cum_logprob: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None  # decoded generated tokens
    finish_reason: str | None = None
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


def beam_score(seq: BeamSearchSequence, length_penalty: float) -> float:
    """Length-penalised cumulative logprob over the generated tokens (as HF transformers;
    vLLM divides by the whole sequence length instead)."""
    return seq.cum_logprob / (max(1, len(seq.output_token_ids)) ** length_penalty)


def beam_search(
    run, tokenize, eos_ids: set[int], decode, prompts: list, params: BeamSearchParams
) -> list[BeamSearchOutput]:
    """`run(prompt_dicts, sampling_params) -> list[RequestOutput]` is the engine; `tokenize`
    turns a prompt into (text, ids); `decode` turns ids into text."""
    bw = params.beam_width
    sp = SamplingParams(
        max_tokens=1,
        logprobs=2 * bw,
        temperature=params.temperature,
        ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    live, done = [], []
    for p in prompts:
        _, ids = tokenize(p)
        live.append([BeamSearchSequence(list(ids), num_prompt_tokens=len(ids))])
        done.append([])
    for _ in range(params.max_tokens):
        flat = [b for beams in live for b in beams]
        if not flat:
            break
        outs: list[RequestOutput] = run([{"prompt_token_ids": b.tokens} for b in flat], sp)
        it = iter(outs)
        for pi, beams in enumerate(live):
            cands = []
            for b in beams:
                for tok, lp in next(it).outputs[0].logprobs[0].items():
                    cands.append(
                        BeamSearchSequence(
                            b.tokens + [tok],
                            b.cum_logprob + lp.logprob,
                            b.logprobs + [lp.logprob],
                            num_prompt_tokens=b.num_prompt_tokens,
                        )
                    )
            cands.sort(key=lambda c: c.cum_logprob, reverse=True)
            nxt = []
            for c in cands[: 2 * bw]:
                if not params.ignore_eos and c.tokens[-1] in eos_ids:
                    c.finish_reason = "stop"
                    done[pi].append(c)
                elif len(nxt) < bw:
                    nxt.append(c)
            live[pi] = nxt
    results = []
    for pi in range(len(prompts)):
        for b in live[pi]:
            b.finish_reason = "length"
        ranked = sorted(
            done[pi] + live[pi], key=lambda s: beam_score(s, params.length_penalty), reverse=True
        )[:bw]
        for s in ranked:
            s.text = decode(s.output_token_ids)
        results.append(BeamSearchOutput(ranked))
    return results
