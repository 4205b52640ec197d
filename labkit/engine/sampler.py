"""Logits -> next tokens, with vLLM's sampling semantics.

Logprobs are those of the raw model distribution (vLLM's default `raw_logprobs`), before
temperature and truncation. Each seeded request samples from its own generator, so its text does
not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.engine.request import Request
from labkit.transfer import to_device


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token
    top_logprobs: list[list[tuple[int, float]] | None]  # requested top-k, per row
    ranks: list[int | None]


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p cut, row by row; k <= 0 means no top-k."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)
    cut = ranks[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(-1)
    # top-p keeps the smallest prefix whose mass reaches p (the first token always stays)
    cut |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    cut |= probs < (min_p[:, None] * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


class PendingSample:
    """A sampling step's results on their way to the host: the chosen ids stay on the device
    (`token_ids`: the next step's inputs under async scheduling); everything the host needs is
    copied back in the background. `result()` waits for that copy only, not for later work."""

    def __init__(
        self,
        token_ids: torch.Tensor,
        token_lp: torch.Tensor,
        ranks,
        top_v,
        top_i,
        want: list[int],
        top_counts: list[int],
    ):
        self.token_ids = token_ids
        self._want, self._top_counts = want, top_counts
        self._host = [
            _to_host(t)
            for t in (torch.stack([token_ids.double(), token_lp.double()]), ranks, top_v, top_i)
        ]
        self._event = None
        if token_ids.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        pair, ranks, top_v, top_i = (None if t is None else t.tolist() for t in self._host)
        tokens, lps = pair
        n = len(tokens)
        tops: list = [None] * n
        all_ranks: list = [None] * n
        for j, (i, k) in enumerate(zip(self._want, self._top_counts)):
            all_ranks[i] = ranks[j]
            tops[i] = list(zip(top_i[j][:k], top_v[j][:k])) if k else []
        return SampleResult([int(t) for t in tokens], lps, tops, all_ranks)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or not t.is_cuda:
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


class Sampler:
    """Runs where the logits are (the GPU on CUDA). Nothing in it waits for the GPU: its
    launches queue up behind the forward pass, and the chosen ids and logprobs (and any requested
    top-k and ranks) come back through a `PendingSample`."""

    def __init__(self, seed: int, eos_token_ids: set[int], device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> PendingSample:
        logits = logits.float()
        dev = logits.device
        # Logprobs are of the raw logits (before the processing below): keep them, with each
        # row's normaliser; the full log-softmax only where top-k logprobs or ranks are asked.
        raw, lse = logits, logits.logsumexp(-1)
        if any(self._needs_processing(r) for r in reqs):
            logits = self.process(logits.clone(), reqs)
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if not sampled:
            chosen = logits.argmax(-1)
        else:
            p = [reqs[i].params for i in sampled]
            every = len(sampled) == len(reqs)
            idx = None if every else to_device(sampled, torch.long, dev)
            rows = logits if every else logits[idx]
            rows = rows / to_device([x.temperature for x in p], torch.float32, dev)[:, None]
            if any(x.top_k > 0 or x.top_p < 1 or x.min_p > 0 for x in p):
                rows = apply_top_k_top_p_min_p(
                    rows,
                    to_device([x.top_k for x in p], torch.long, dev),
                    to_device([x.top_p for x in p], torch.float32, dev),
                    to_device([x.min_p for x in p], torch.float32, dev),
                )
            probs = rows.softmax(-1)
            # Gumbel-style race: argmax(p / E) with E ~ Exp(1) samples from p. Unseeded rows
            # draw together from the engine's generator; seeded rows from their own.
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            for j, i in enumerate(sampled):
                if reqs[i].generator is not None:
                    noise[j].exponential_(generator=reqs[i].generator)
            picks = (probs / noise).argmax(-1)
            if every:
                chosen = picks
            else:
                chosen = logits.argmax(-1)
                chosen[idx] = picks
        token_lp = raw.gather(-1, chosen[:, None])[:, 0] - lse
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        counts = [reqs[i].params.logprobs for i in want]
        ranks = top_v = top_i = None
        if want:
            w = to_device(want, torch.long, dev)
            logprobs = raw[w] - lse[w, None]
            ranks = (logprobs > token_lp[w, None]).sum(-1) + 1
            if max(counts):
                top_v, top_i = logprobs.topk(max(counts))
        return PendingSample(chosen, token_lp, ranks, top_v, top_i, want, counts)

    def _needs_processing(self, r: Request) -> bool:
        p = r.params
        return bool(
            p.allowed_token_ids is not None
            or r.bad_words_token_ids
            or p.logit_bias
            or p.has_penalties
            or r.num_output_tokens < p.min_tokens
        )

    def process(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Allowed tokens, bad words, min_tokens, logit bias and penalties, in vLLM's order.
        Rows with default parameters are left alone (the common case costs nothing)."""
        for i, r in enumerate(reqs):
            p = r.params
            if p.allowed_token_ids is not None:
                keep = torch.full_like(logits[i], float("-inf"))
                keep[to_device(p.allowed_token_ids, torch.long, logits.device)] = 0
                logits[i] += keep
            banned = [
                seq[-1]
                for seq in r.bad_words_token_ids
                if len(seq) == 1 or r.output_token_ids[-(len(seq) - 1) :] == seq[:-1]
            ]
            if r.num_output_tokens < p.min_tokens:
                banned += p.stop_token_ids + ([] if p.ignore_eos else list(self.eos_token_ids))
            if banned:
                logits[i, to_device(banned, torch.long, logits.device)] = float("-inf")
            if p.logit_bias:
                ids = to_device(list(p.logit_bias), torch.long, logits.device)
                logits[i, ids] += to_device(
                    list(p.logit_bias.values()), logits.dtype, logits.device
                )
            if p.has_penalties:
                apply_penalties(
                    logits[i],
                    r.prompt_token_ids,
                    r.output_token_ids,
                    p.presence_penalty,
                    p.frequency_penalty,
                    p.repetition_penalty,
                )
        return logits


def apply_penalties(
    row: torch.Tensor,
    prompt_ids: list[int],
    output_ids: list[int],
    presence: float,
    frequency: float,
    repetition: float,
) -> None:
    """vLLM's formulas, in place on one row of logits: repetition divides positive and
    multiplies negative logits of every token seen in the prompt or the output; frequency
    subtracts count x penalty and presence subtracts the penalty once, over output tokens."""
    vocab, dev = row.shape[0], row.device
    out_counts = torch.bincount(to_device(output_ids, torch.long, dev), minlength=vocab)[:vocab]
    if repetition != 1:
        seen = out_counts > 0
        if prompt_ids:
            seen[to_device(prompt_ids, torch.long, dev)] = True
        row[seen] = torch.where(row[seen] > 0, row[seen] / repetition, row[seen] * repetition)
    row -= frequency * out_counts + presence * (out_counts > 0)
