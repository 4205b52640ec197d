"""Logits -> next tokens, with vLLM's sampling semantics.

Logprobs are those of the raw model distribution (vLLM's default `raw_logprobs`), before
temperature and truncation. A seeded request's draws depend on its seed and position only, so
its text does not depend on what else is in the batch.

Two paths draw the same distributions: on CUDA one kernel for the batch (labkit.kernels.sampling:
no sort of the vocabulary, no host sync; Philox draws from a per-row seed), elsewhere torch ops
(top-k/top-p/min-p over each row's largest logits, ordered by a selection, a row sorted whole only
where its filters reach past them; inverse-CDF draws from torch generators), which are the
kernel's reference. The two give different draws for the same seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from labkit.engine.request import Request
from labkit.layers.switches import KernelSwitches
from labkit.transfer import to_device


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token
    top_logprobs: list[list[tuple[int, float]] | None]  # requested top-k, per row
    ranks: list[int | None]


# Candidates ordered for top-p / min-p when some row has no top-k: a selection of this many of a
# row's largest logits (~15x cheaper than sorting 152k entries on a CPU) serves every row whose
# filters provably cut everything after them; the other rows are sorted whole.
CANDIDATES = 1024


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    max_k: int | None = None,
) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p cut, row by row; k <= 0 means no top-k.
    `max_k`: the largest k of any row, if every row has one: only that many of each row's
    largest logits are ordered (a top-k selection, not a sort of the vocabulary). Otherwise the
    CANDIDATES largest are ordered, and a row is sorted whole only where its filters may keep a
    token past them."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if max_k is not None and max_k < vocab:
        ordered = logits.topk(max_k, dim=-1)
    elif CANDIDATES >= vocab:
        ordered = logits.sort(-1, descending=True)
    else:
        return _filter_candidates(logits, k, top_p, min_p)
    return _scatter(logits, *_filter_ordered(*ordered, k, top_p, min_p))


def _filter_candidates(
    logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """apply_top_k_top_p_min_p over each row's CANDIDATES largest logits, the rows whose
    filters may keep a token past them sorted whole."""
    vals, idx = logits.topk(CANDIDATES, dim=-1)
    # Past the candidates every token is cut when the row's top-k ends inside them, or when it
    # has no top-k and the candidates already hold top_p of the mass, or min-p cuts the last.
    lse = logits.logsumexp(-1)
    no_k = k == logits.shape[-1]
    mass = (vals - lse[:, None]).exp().sum(-1)
    min_p_ends = vals[:, -1] - vals[:, 0] < torch.log(min_p)  # log(0) = -inf: never
    enough = (k <= CANDIDATES) | (no_k & ((mass >= top_p) | min_p_ends))
    norm = torch.where(no_k, lse, torch.full_like(lse, float("nan")))  # nan: over the top-k
    out = _scatter(logits, *_filter_ordered(vals, idx, k, top_p, min_p, norm))
    if not enough.all():
        rows = (~enough).nonzero()[:, 0]
        sub = logits[rows]
        ordered = sub.sort(-1, descending=True)
        out[rows] = _scatter(sub, *_filter_ordered(*ordered, k[rows], top_p[rows], min_p[rows]))
    return out


def _filter_ordered(
    ordered: torch.Tensor,
    idx: torch.Tensor,
    k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ordered logits with what the filters cut at -inf, their vocabulary ids): `ordered` holds
    each row's largest logits in descending order. Top-p and min-p see the distribution after
    top-k; `norm` gives a row's log normaliser where `ordered` is not the whole of it (nan: the
    row's top-k lies inside `ordered`, which then normalises it)."""
    ranks = torch.arange(ordered.shape[-1], device=ordered.device)
    cut = ranks[None, :] >= k[:, None]
    kept = ordered.masked_fill(cut, float("-inf"))
    if norm is None:
        probs = kept.softmax(-1)
    else:
        norm = torch.where(norm.isnan(), kept.logsumexp(-1), norm)
        probs = (kept - norm[:, None]).exp()
    # top-p keeps the smallest prefix whose mass reaches p (the first token always stays)
    cut |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    cut |= probs < (min_p[:, None] * probs[:, :1])
    return ordered.masked_fill(cut, float("-inf")), idx


def _scatter(logits: torch.Tensor, ordered: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.full_like(logits, float("-inf")).scatter_(-1, idx, ordered)


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
    top-k and ranks) come back through a `PendingSample`. With `switches.use_sampling_kernel`
    it draws with labkit.kernels.sampling (CUDA, or the Triton interpreter), else with torch."""

    def __init__(
        self,
        seed: int,
        eos_token_ids: set[int],
        device: torch.device,
        switches: KernelSwitches | None = None,
    ):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.row_seeds = random.Random(seed)  # the kernel's unseeded rows
        self.eos_token_ids = eos_token_ids
        self.use_kernel = switches is not None and switches.use_sampling_kernel

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> PendingSample:
        # Logprobs are of the raw logits (before the processing below); the full log-softmax
        # only where top-k logprobs or ranks are asked.
        raw = logits if self.use_kernel else logits.float()
        processed = any(self._needs_processing(r) for r in reqs)
        rows = self.process(logits.to(torch.float32, copy=True), reqs) if processed else raw
        if self.use_kernel:
            chosen, lse = self._draw_kernel(rows, reqs)
            if processed:  # the kernel's normaliser is of what it read
                lse = raw.float().logsumexp(-1)
        else:
            chosen, lse = self._draw_torch(rows, reqs), raw.logsumexp(-1)
        token_lp = raw.gather(-1, chosen[:, None])[:, 0].float() - lse
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        counts = [reqs[i].params.logprobs for i in want]
        ranks = top_v = top_i = None
        if want:
            w = to_device(want, torch.long, raw.device)
            logprobs = raw[w].float() - lse[w, None]
            ranks = (logprobs > token_lp[w, None]).sum(-1) + 1
            if max(counts):
                top_v, top_i = logprobs.topk(max(counts))
        return PendingSample(chosen, token_lp, ranks, top_v, top_i, want, counts)

    def _draw_kernel(
        self, logits: torch.Tensor, reqs: list[Request]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One launch for the batch; top-k's threshold (the k-th largest logit) from a topk of
        the rows that ask for it, which selects without sorting the vocabulary."""
        from labkit.kernels.sampling import sample

        dev, vocab = logits.device, logits.shape[-1]
        ps = [r.params for r in reqs]
        floats = to_device(
            [[p.temperature for p in ps], [p.top_p for p in ps], [p.min_p for p in ps]],
            torch.float32,
            dev,
        )
        seeds = to_device([self._row_seed(r) for r in reqs], torch.int64, dev)
        kth = torch.full((len(reqs),), -math.inf, device=dev)
        ks = [min(p.top_k, vocab) if p.top_k > 0 and not p.greedy else 0 for p in ps]
        if any(ks):
            with_k = [i for i, k in enumerate(ks) if k]
            idx = to_device(with_k, torch.long, dev)
            top = logits[idx].topk(max(ks), dim=-1).values
            pos = to_device([ks[i] - 1 for i in with_k], torch.long, dev)
            kth[idx] = top.gather(-1, pos[:, None])[:, 0].float()
        filters = any(not p.greedy and (p.top_p < 1 or p.min_p > 0) for p in ps)
        return sample(logits, floats[0], kth, floats[1], floats[2], seeds, filters=filters)

    def _row_seed(self, r: Request) -> int:
        """A seeded sequence's draw depends on its seed (+ its index among `n`) and its
        position, nothing else; other rows take the engine's stream."""
        if r.params.seed is None:
            return self.row_seeds.getrandbits(63)
        return _mix64(_mix64(r.params.seed + r.index) ^ r.num_output_tokens)

    def _draw_torch(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if not sampled:
            return logits.argmax(-1)
        dev = logits.device
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
                max(x.top_k for x in p) if all(x.top_k > 0 for x in p) else None,
            )
        probs = rows.softmax(-1)
        # Inverse CDF: one uniform per row (an exponential draw per vocabulary entry costs ten
        # times more on the CPU). Unseeded rows draw together from the engine's generator,
        # seeded rows from their own; u in (0, 1], so a zero-probability token is never chosen.
        u = 1 - torch.rand(len(sampled), 1, generator=self.generator, device=dev)
        for j, i in enumerate(sampled):
            if reqs[i].generator is not None:
                u[j] = 1 - torch.rand(1, generator=reqs[i].generator, device=dev)
        cdf = probs.cumsum(-1)
        picks = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)[:, 0]
        if every:
            return picks
        chosen = logits.argmax(-1)
        chosen[idx] = picks
        return chosen

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


def _mix64(x: int) -> int:
    """splitmix64's finaliser, to 63 bits: nearby seeds and positions give unrelated streams."""
    x = (x + 0x9E3779B97F4A7C15) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1
