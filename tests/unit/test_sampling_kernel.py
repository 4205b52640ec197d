"""labkit.kernels.sampling against its torch reference (the filtered softmax of
labkit.engine.sampler), under the Triton interpreter on the CPU: greedy rows and normalisers
exactly, sampled rows by their frequencies over many draws (a chi-square bound), and the
Sampler's kernel path end to end."""

import math

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from helpers import assert_frequencies_match  # noqa: E402

from labkit.engine.request import Request  # noqa: E402
from labkit.engine.sampler import Sampler, apply_top_k_top_p_min_p  # noqa: E402
from labkit.kernels.sampling import _first_walk, sample  # noqa: E402
from labkit.layers.switches import KernelSwitches  # noqa: E402
from labkit.sampling_params import SamplingParams  # noqa: E402


def _kth(logits: torch.Tensor, k: int) -> float:
    return logits.topk(k).values[-1].item() if k else -math.inf


@pytest.mark.parametrize("split", [False, True])
def test_greedy_rows_take_the_first_argmax_and_the_raw_normaliser(split):
    """Whole rows per program, or chunks of a row per program (split) and a combine."""
    torch.manual_seed(0)
    logits = torch.randn(5, 70)
    logits[1, 3] = logits[1, 50] = 9.0  # equal maxima in two blocks: the first wins
    logits[2, :32] = -math.inf  # whole blocks masked out, as a grammar's bitmask does
    n = len(logits)
    ids, lse = sample(
        logits.to(torch.bfloat16).float(),
        torch.zeros(n),
        torch.full((n,), -math.inf),
        torch.ones(n),
        torch.zeros(n),
        torch.zeros(n, dtype=torch.int64),
        block=16,
        split=split,
        split_block=16,
    )
    ref = logits.to(torch.bfloat16).float()
    assert ids.tolist() == ref.argmax(-1).tolist() and ids[1] == 3
    torch.testing.assert_close(lse, ref.logsumexp(-1))


# (temperature, top_k, top_p, min_p) per kind of row; a batch interleaves them
FILTERS = [(1.0, 0, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 0, 1.0, 0.1)]
FILTERS_B = [(1.0, 10, 0.9, 0.0), (0.8, 0, 0.6, 0.05), (1.0, 0, 0.95, 0.0)]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("vocab,block,filters", [(37, 16, FILTERS), (100, 64, FILTERS_B)])
def test_sampled_frequencies_match_the_filtered_softmax(vocab, block, filters, split):
    """split: the first draw's walk goes by the chunks' masses (chunks of 8 and 32 entries)."""
    draws = 300
    g = torch.Generator().manual_seed(vocab)
    base = torch.randn(vocab, generator=g) * 2
    kinds = [i % len(filters) for i in range(draws * len(filters))]
    n = len(kinds)
    ids, _ = sample(
        base.expand(n, vocab).contiguous(),
        torch.tensor([filters[k][0] for k in kinds]),
        torch.tensor([_kth(base, filters[k][1]) for k in kinds]),
        torch.tensor([filters[k][2] for k in kinds]),
        torch.tensor([filters[k][3] for k in kinds]),
        torch.arange(n, dtype=torch.int64) * 7919 + vocab,
        block=block,
        split=split,
        split_block=block // 2 if split else 4096,
    )
    kinds_t = torch.tensor(kinds)
    for k, (t, top_k, top_p, min_p) in enumerate(filters):
        probs = apply_top_k_top_p_min_p(
            (base / t)[None], torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p])
        ).softmax(-1)[0]
        assert_frequencies_match(ids[kinds_t == k], probs, f"filter {k}")


@pytest.mark.parametrize("split", [False, True])
def test_a_seeded_row_draws_the_same_wherever_it_sits_in_the_batch(split):
    torch.manual_seed(1)
    row = torch.randn(40)
    others = torch.randn(3, 40)

    def draw(logits, seeds):
        n = len(logits)
        ids, _ = sample(
            logits,
            torch.full((n,), 0.9),
            torch.full((n,), -math.inf),
            torch.full((n,), 0.9),
            torch.zeros(n),
            torch.tensor(seeds, dtype=torch.int64),
            block=16,
            split=split,
            split_block=16,
        )
        return ids.tolist()

    alone = [draw(row[None], [s])[0] for s in range(8)]
    crowded = [draw(torch.cat([others, row[None]]), [11, 12, 13, s])[3] for s in range(8)]
    assert alone == crowded and len(set(alone)) > 1


def _request(params: SamplingParams, output: list[int] = ()) -> Request:
    r = Request("r", "r", 0, None, [5, 6], params)
    r.token_ids += list(output)
    return r


def test_the_samplers_kernel_path_keeps_logprobs_penalties_and_seeds():
    torch.manual_seed(2)
    logits = torch.randn(3, 50)
    logits[2, 7] = 30.0  # the penalised row's favourite
    kernel = Sampler(0, {0}, torch.device("cpu"), KernelSwitches(use_sampling_kernel=True))
    reqs = [
        _request(SamplingParams(temperature=0, logprobs=2)),
        _request(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, logprobs=0)),
        _request(SamplingParams(temperature=0, repetition_penalty=100.0), output=[7]),
    ]
    out = kernel(logits, reqs).result()
    raw = logits.log_softmax(-1)
    assert out.token_ids[0] == logits[0].argmax()
    assert out.token_ids[2] != 7  # the penalty applied before the draw
    for i in range(3):  # logprobs of the raw distribution, whatever drew the token
        assert abs(out.logprobs[i] - raw[i, out.token_ids[i]].item()) < 1e-5
    assert [t for t, _ in out.top_logprobs[0]] == raw[0].topk(2).indices.tolist()
    assert out.ranks[1] == int((raw[1] > raw[1, out.token_ids[1]]).sum()) + 1
    # The seeded row: the same token in another batch, at the same position
    again = kernel(logits[1:2].clone(), [reqs[1]]).result()
    assert again.token_ids == [out.token_ids[1]]


@pytest.mark.parametrize("mode", ["top_p", "min_p"])
def test_the_samplers_kernel_path_applies_top_p_and_min_p_to_a_few_rows(mode):
    """A few rows take the split path, whose check of the first draw the Sampler must ask for
    when a row has top-p or min-p: here only token 7 passes either filter (p = 0.75), so 40
    draws that skipped the check would include another token about once in 1 - 1e-5."""
    logits = torch.zeros(40, 50)
    logits[:, 7] = 5.0
    extra = dict(top_p=0.5) if mode == "top_p" else dict(min_p=0.5)
    reqs = [_request(SamplingParams(temperature=1.0, seed=i, **extra)) for i in range(40)]
    kernel = Sampler(0, {0}, torch.device("cpu"), KernelSwitches(use_sampling_kernel=True))
    assert kernel(logits, reqs).result().token_ids == [7] * 40


@triton.jit
def _first_walk_of(row, chunk_mass, out, V, target, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """The split path's first walk for a temperature-1 row with no filters."""
    mass = tl.load(chunk_mass + tl.arange(0, CHUNKS))
    m = tl.max(tl.load(row + tl.arange(0, CHUNKS * BLOCK)), 0)
    lower = -float("inf")
    tl.store(out, _first_walk(row, V, m, 1.0, lower, target, mass, CHUNKS, BLOCK))


def test_the_first_walk_never_lands_in_a_chunk_without_mass():
    """A target of 0 (a uniform draw of exactly 0) in a row whose first chunks a grammar masked:
    the split path's first walk picks the first token the proposal holds, as the whole-row walk
    does, not the start of an empty chunk; a target past three chunks' mass, the fourth."""
    row = torch.randn(64)
    row[:37] = -math.inf
    mass = (row - row.max()).exp().view(4, 16).sum(-1)
    out = torch.zeros(1, dtype=torch.int32)
    for target, first_ok in ((0.0, 37), (mass[:3].sum().item() + 1e-6, 48)):
        _first_walk_of[(1,)](row, mass, out, 64, target, CHUNKS=4, BLOCK=16)
        assert out.item() >= first_ok and row[out.item()] > -math.inf
