"""The sampler on hand-made logits: greedy, truncation, seeds, logprobs and the logits
processors, with no model."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_frequencies_match

from labkit.engine.request import Request
from labkit.engine.sampler import Sampler, apply_top_k_top_p_min_p
from labkit.sampling_params import SamplingParams

EOS = 0


def request(params: SamplingParams, prompt=(5, 6), seed: int | None = None) -> Request:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return Request("r", "r", 0, None, list(prompt), params, generator=gen)


def sample(logits: torch.Tensor, reqs: list[Request], seed: int = 0):
    return Sampler(seed, {EOS}, torch.device("cpu"))(logits, reqs).result()


def test_greedy_takes_the_argmax_with_its_raw_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    out = sample(logits, [request(SamplingParams(temperature=0, logprobs=2))])
    assert out.token_ids == [1]
    assert abs(out.logprobs[0] - logits.log_softmax(-1)[0, 1].item()) < 1e-6
    assert [t for t, _ in out.top_logprobs[0]] == [1, 3] and out.ranks == [1]


def test_truncation_keeps_what_top_k_top_p_and_min_p_allow():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def masked(k, p, m):
        kept = apply_top_k_top_p_min_p(
            logits, torch.tensor([k]), torch.tensor([p]), torch.tensor([m])
        )
        return kept.isfinite()[0].tolist()

    assert masked(2, 1.0, 0.0) == [True, True, False, False]
    assert masked(0, 0.8, 0.0) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert masked(0, 1.0, 0.4) == [True, True, False, False]  # >= 0.4 * 0.5
    assert masked(0, 0.1, 0.0) == [True, False, False, False]  # the top token always stays


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, 50)
    alone = sample(logits, [request(SamplingParams(temperature=1.0), seed=7)], seed=1)
    crowd = [request(SamplingParams(temperature=1.0)) for _ in range(3)]
    mixed = sample(
        torch.cat([torch.randn(3, 50), logits]),
        crowd + [request(SamplingParams(temperature=1.0), seed=7)],
        seed=2,
    )
    assert mixed.token_ids[3] == alone.token_ids[0]


def test_min_tokens_holds_back_eos_and_allowed_ids_restrict():
    logits = torch.tensor([[9.0, 1.0, 0.0, 0.5]])
    assert sample(logits, [request(SamplingParams(temperature=0, min_tokens=2))]).token_ids == [1]
    only = request(SamplingParams(temperature=0, allowed_token_ids=[2, 3]))
    assert sample(logits, [only]).token_ids == [3]


def test_penalties_and_bias_move_the_argmax():
    logits = torch.tensor([[0.0, 2.0, 1.9, 0.0]])
    rep = request(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=(1,))
    assert sample(logits, [rep]).token_ids == [2]  # 2.0 / 2 < 1.9
    bias = request(SamplingParams(temperature=0, logit_bias={3: 5.0}))
    assert sample(logits, [bias]).token_ids == [3]


def test_top_k_rows_select_instead_of_sorting():
    """With a top-k on every row, ordering only the largest max_k logits cuts what the full
    sort cuts."""
    logits = torch.randn(6, 500)
    top_k = torch.tensor([1, 5, 40, 40, 7, 500])
    top_p = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.3, 0.95])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.0, 0.0])
    full = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    assert torch.equal(apply_top_k_top_p_min_p(logits, top_k, top_p, min_p, 500), full)
    top_k[-1] = 40  # max_k 40: fewer than the vocabulary, selected by topk
    assert torch.equal(
        apply_top_k_top_p_min_p(logits, top_k, top_p, min_p, 40),
        apply_top_k_top_p_min_p(logits, top_k, top_p, min_p),
    )


def test_candidate_rows_cut_what_the_full_sort_cuts(monkeypatch):
    """Some row without a top-k: each row's CANDIDATES largest logits are ordered, and a row
    whose filters may keep a token past them is sorted whole; either way the cut equals the full
    sort's. Rows: a peaked top-p nucleus, a flat row whose nucleus passes the candidates, min-p
    alone, a top-k beyond the candidates, a small top-k, a row mostly masked to -inf."""
    from labkit.engine import sampler

    logits = torch.randn(7, 500, generator=torch.Generator().manual_seed(5))
    logits[0] *= 8  # peaked: the nucleus is a few tokens
    logits[1] *= 0.01  # flat: top-p 0.99 keeps ~495 tokens, past the 64 candidates
    logits[5, 3:] = float("-inf")
    top_k = torch.tensor([0, 0, 0, 300, 10, 0, 0])
    top_p = torch.tensor([0.9, 0.99, 1.0, 0.95, 0.8, 0.9, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr(sampler, "CANDIDATES", 10**9)
    full = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    monkeypatch.setattr(sampler, "CANDIDATES", 64)
    got = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    assert torch.equal(got.isfinite(), full.isfinite())
    torch.testing.assert_close(got.softmax(-1), full.softmax(-1))
    assert full[1].isfinite().sum() > 64 and full[0].isfinite().sum() < 64


@pytest.mark.parametrize("all_top_k", [False, True], ids=["sorted", "top_k_selected"])
def test_torch_draws_match_the_filtered_softmax(all_top_k):
    """The torch path's inverse-CDF draws, 3000 per filter in one batch (temperature, top-k,
    top-p, min-p), against the filtered softmax: no cut token drawn, a chi-square bound at
    p = 1e-4 (tokens expected fewer than 5 times pooled), seeded rows among them."""
    vocab, draws = 60, 3000
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    filters = [(1.0, 0, 1.0, 0.0), (0.7, 8, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.2, 0, 1.0, 0.05)]
    if all_top_k:  # every row with a top-k: the sampler selects, it does not sort
        filters = [(1.0, 30, 1.0, 0.0), (0.7, 8, 0.9, 0.0), (1.2, 20, 1.0, 0.05)]
    reqs = []
    for t, k, p, m in filters:
        params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
        reqs += [request(params, seed=i if i % 3 == 0 else None) for i in range(draws)]
    ids = torch.tensor(sample(base.expand(len(reqs), vocab).contiguous(), reqs).token_ids)
    for f, (t, k, p, m) in enumerate(filters):
        probs = apply_top_k_top_p_min_p(
            (base / t)[None], torch.tensor([k]), torch.tensor([p]), torch.tensor([m])
        ).softmax(-1)[0]
        assert_frequencies_match(ids[f * draws : (f + 1) * draws], probs, f"filter {f}")
