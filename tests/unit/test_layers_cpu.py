"""CPU fast paths in the layers give the plain formulas' results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labkit.distributed import TPGroup
from labkit.layers.embedding import CPU_VOCAB_ROWS_MAX, ParallelLMHead
from labkit.layers.rotary import RotaryEmbedding, _rotate
from labkit.layers.switches import KernelSwitches


@pytest.mark.parametrize("rows", [1, 8, CPU_VOCAB_ROWS_MAX, CPU_VOCAB_ROWS_MAX + 1])
def test_lm_head_matches_linear_on_either_side_of_the_row_threshold(rows):
    head = ParallelLMHead(1000, 64, tp=TPGroup(), switches=KernelSwitches(), workspace=None)
    head.weight.data.normal_()
    x = torch.randn(rows, 64)
    torch.testing.assert_close(head(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-5)


def test_rotary_rotates_adjacent_q_and_k_views_in_one_go_exactly():
    rot = RotaryEmbedding(16, 128, 10000.0)
    qkv = torch.randn(5, 16 * (4 + 2 + 2))
    pos = torch.tensor([0, 3, 7, 8, 100])
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(5, 4, 16), k.view(5, 2, 16)
    got_q, got_k = rot(pos, q, k)
    cos, sin = rot.cos[pos].unsqueeze(1), rot.sin[pos].unsqueeze(1)
    assert torch.equal(got_q, _rotate(q, cos, sin)) and torch.equal(got_k, _rotate(k, cos, sin))
    # k not in q's buffer (even where its offset would fit): rotated one by one, the same values.
    q_alone = torch.empty(5 * 128).as_strided(q.shape, q.stride()).copy_(q)
    k_elsewhere = torch.empty(5 * 128)[64:].as_strided(k.shape, q.stride()).copy_(k)
    got_q2, got_k2 = rot(pos, q_alone, k_elsewhere)
    assert torch.equal(got_q2, got_q) and torch.equal(got_k2, got_k)


def test_profile_categories():
    """The LM head shares the embedding's sharding but is a matmul to the profiler."""
    from labkit.layers.attention import Attention
    from labkit.layers.embedding import VocabParallelEmbedding
    from labkit.layers.linear import ColumnParallelLinear, RowParallelLinear
    from labkit.layers.norm import RMSNorm

    assert ParallelLMHead.profile_category == "matmul"
    assert VocabParallelEmbedding.profile_category == "other"
    assert ColumnParallelLinear.profile_category == RowParallelLinear.profile_category == "matmul"
    assert Attention.profile_category == "attention"
    assert RMSNorm.profile_category == RotaryEmbedding.profile_category == "norm/rope/activation"
