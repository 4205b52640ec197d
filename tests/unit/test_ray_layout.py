"""The Ray backend's card arithmetic, without a cluster: which CUDA index and which
CUDA_VISIBLE_DEVICES each rank gets from the GPU ids Ray assigned (the GPU path itself needs
GPUs and is not run on the CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from labkit.engine.executor.ray_actors import _card_layout, _local_index  # noqa: E402


def test_ranks_on_one_node_see_all_the_engines_cards_there():
    # Bundle order: rank 0's card holder first. Ray gave them cards 3, 1, 10 and 2.
    devices = [("10.0.0.1", ["3"]), ("10.0.0.1", ["1"]), ("10.0.0.1", ["10"]), ("10.0.0.1", ["2"])]
    assert _card_layout(devices) == [
        (2, "1,2,3,10"),
        (0, "1,2,3,10"),
        (3, "1,2,3,10"),
        (1, "1,2,3,10"),
    ]


def test_each_node_has_its_own_view():
    devices = [("10.0.0.1", ["0"]), ("10.0.0.1", ["1"]), ("10.0.0.2", ["5"]), ("10.0.0.2", ["4"])]
    assert _card_layout(devices) == [(0, "0,1"), (1, "0,1"), (1, "4,5"), (0, "4,5")]


def test_rank0_card_in_the_drivers_numbering():
    assert _local_index("3", None) == 3
    assert _local_index("3", "2,3") == 1
    with pytest.raises(RuntimeError, match="cannot see"):
        _local_index("0", "2,3")
