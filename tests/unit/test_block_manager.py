"""The paged KV cache's bookkeeping: allocation, freeing, prefix reuse and LRU eviction."""

from __future__ import annotations

from labkit.engine.block_manager import BlockManager
from labkit.engine.request import Request
from labkit.sampling_params import SamplingParams


def request(ids: list[int], rid: str = "r") -> Request:
    return Request(rid, rid, 0, None, ids, SamplingParams())


def test_allocate_gives_whole_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    r = request(list(range(10)))
    assert bm.blocks_needed(r, 10) == 3
    bm.allocate(r, 10)
    assert len(r.block_table) == 3 and bm.num_used == 3 and bm.num_free == 5
    r.num_computed_tokens = 10
    bm.allocate(r, 2)  # 12 tokens still fit in 3 blocks
    assert len(r.block_table) == 3
    bm.allocate(r, 3)  # 13 do not
    assert len(r.block_table) == 4
    bm.free(r)
    assert bm.num_free == 8 and r.block_table == []


def test_can_allocate_is_false_when_blocks_run_out():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.can_allocate(request([1] * 8), 8)
    assert not bm.can_allocate(request([1] * 9), 9)


def test_a_committed_prompt_prefix_is_reused_by_the_next_request():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = request(list(range(9)), "a")
    bm.allocate(first, 9)
    first.num_computed_tokens = 9
    bm.commit(first)  # two full blocks get hashes
    second = request(list(range(8)) + [99, 100], "b")
    assert bm.match_prefix(second) == 8  # both full blocks, shared
    assert second.block_table == first.block_table[:2]
    assert bm.ref_counts[first.block_table[0]] == 2


def test_the_last_prompt_token_is_always_recomputed():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = request(list(range(8)), "a")
    bm.allocate(first, 8)
    first.num_computed_tokens = 8
    bm.commit(first)
    same = request(list(range(8)), "b")
    assert bm.match_prefix(same) == 4  # its logits are needed: the last block is computed


def test_freed_blocks_stay_reusable_until_evicted_least_recently_used_first():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = request([1, 2, 3], "a")
    bm.allocate(a, 3)
    a.num_computed_tokens = 3
    bm.commit(a)
    cached_block = a.block_table[0]
    bm.free(a)
    assert bm.match_prefix(request([1, 2, 7], "b")) == 2  # still cached after the free
    bm2 = BlockManager(num_blocks=1, block_size=2)
    c = request([1, 2, 3], "c")
    bm2.allocate(c, 2)
    c.num_computed_tokens = 2
    bm2.commit(c)
    bm2.free(c)
    d = request([5, 6, 7], "d")
    bm2.allocate(d, 2)  # the only block is handed out again: evicted
    assert bm2.match_prefix(request([1, 2, 3], "e")) == 0
    assert cached_block in range(3)


def test_prefix_caching_off_matches_nothing_and_reset_needs_an_idle_cache():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = request([1, 2, 3], "a")
    bm.allocate(a, 3)
    a.num_computed_tokens = 3
    bm.commit(a)
    assert bm.match_prefix(request([1, 2, 3], "b")) == 0
    assert bm.reset_prefix_cache() is False  # blocks in use
    bm.free(a)
    assert bm.reset_prefix_cache() is True
