"""PeerAllReduce's set-up protocol, on the CPU with a fake CUDA runtime: the ranks use the peer
kernel only if every one of them could share and map the buffers, and a rank that fails never
leaves the others waiting. (The kernel itself: tests/unit/test_kernels.py; on GPUs:
dev/gpu_allreduce.py.)"""

import itertools
import threading

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("triton")
import labkit.distributed.custom_all_reduce as car  # noqa: E402

_addresses = itertools.count(0x1000, 0x1000)


class FakeRT:
    """Allocations are numbers; `fail` names the method that raises on `fail_rank`."""

    fail: str | None = None
    fail_rank: int | None = None
    log: list = []

    def __init__(self):
        self.rank = threading.current_thread().name

    def _maybe_fail(self, what):
        if what == self.fail and self.rank == f"rank{self.fail_rank}":
            raise RuntimeError(f"{what} failed: operation not permitted")

    def set_device(self, index):
        self._maybe_fail("set_device")

    def malloc_zeroed(self, nbytes):
        self._maybe_fail("malloc_zeroed")
        ptr = next(_addresses)
        self.log.append(("malloc", ptr))
        return ptr

    def free(self, ptr):
        self.log.append(("free", ptr))

    def ipc_handle(self, ptr):
        return ptr.to_bytes(64, "little")

    def ipc_open(self, handle):
        self._maybe_fail("ipc_open")
        ptr = int.from_bytes(handle, "little") + 0x10_0000_0000  # mapped elsewhere here
        self.log.append(("open", ptr))
        return ptr

    def ipc_close(self, ptr):
        self.log.append(("close", ptr))


def run_ranks(world, monkeypatch, fail=None, fail_rank=None):
    monkeypatch.setattr(car, "CudaRT", FakeRT)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    FakeRT.fail, FakeRT.fail_rank, FakeRT.log = fail, fail_rank, []
    store = dist.HashStore()
    results = {}
    threads = [
        threading.Thread(
            name=f"rank{r}",
            target=lambda r=r: results.__setitem__(
                r, car.PeerAllReduce.setup(r, world, store, torch.device("cpu"))
            ),
        )
        for r in range(world)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank is stuck waiting for another"
    return results


def test_every_rank_maps_every_other_rank(monkeypatch):
    results = run_ranks(3, monkeypatch)
    assert all(isinstance(p, car.PeerAllReduce) for p in results.values())
    own_bufs = [p.own[0] for p in (results[r] for r in range(3))]
    for r, p in results.items():
        ptrs = p.buf_ptrs.tolist()
        assert ptrs[r] == own_bufs[r]  # its own buffer, as allocated
        assert all(
            ptrs[q] == own_bufs[q] + 0x10_0000_0000 for q in range(3) if q != r
        )  # peers, mapped


@pytest.mark.parametrize("fail", ["set_device", "malloc_zeroed", "ipc_open"])
def test_one_rank_failing_sends_every_rank_to_nccl(monkeypatch, fail):
    results = run_ranks(3, monkeypatch, fail=fail, fail_rank=1)
    assert results == {0: None, 1: None, 2: None}
    log = FakeRT.log
    assert {p for op, p in log if op == "malloc"} == {p for op, p in log if op == "free"}
    assert {p for op, p in log if op == "open"} == {p for op, p in log if op == "close"}
