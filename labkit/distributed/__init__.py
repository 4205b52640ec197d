"""Tensor-parallel groups. Each parallel layer is handed its engine's group when it is built and
keeps it, so each engine's model talks only to its own ranks: several engines (TP or not) can
live in one process, as notebook users expect when they compare models.

TP=1 is TP with one rank: every collective is the identity then, so the layers have one code
path. Ranks > 1 talk over a private torch.distributed process group (gloo on the CPU, NCCL on
CUDA), not the global default group. On CUDA, small all-reduces (decode) go through
PeerAllReduce, a one-shot kernel over NVLink peer memory, and the rest through NCCL.

May import: kernels, observe and the foundation modules; never layers or above.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("labkit")

TIMEOUT = datetime.timedelta(seconds=600)
COMMUNICATION_LABEL = "labkit::communication"
_NO_RANGE = contextlib.nullcontext()  # reusable: no allocation per collective


def _labelled() -> contextlib.AbstractContextManager:
    """A profiler range around a collective while the profiler records (the trace's
    communication category); a no-op otherwise."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(COMMUNICATION_LABEL)
    return _NO_RANGE


@dataclass(eq=False)
class TPGroup:
    rank: int = 0
    size: int = 1
    pg: object = None  # the process group, None for a single rank
    store: object = None  # keeps the rendezvous store alive as long as the group
    peer: object = None  # PeerAllReduce for small CUDA messages, if set up

    @classmethod
    def create(
        cls,
        rank: int,
        size: int,
        host: str,
        port: int,
        device: torch.device,
        custom_all_reduce: bool = True,
        pdl: int = 0,
    ) -> TPGroup:
        """`pdl`: the programmatic-dependent-launch mode of the peer all-reduce kernel (see
        labkit.kernels.pdl; 0: off)."""
        if size == 1:
            return cls()
        store = dist.TCPStore(host, port, size, rank == 0, timeout=TIMEOUT)
        if device.type != "cuda":
            return cls(rank, size, dist.ProcessGroupGloo(store, rank, size, TIMEOUT), store)
        group = cls(rank, size, dist.ProcessGroupNCCL(store, rank, size), store)
        if custom_all_reduce:
            from labkit.distributed.custom_all_reduce import PeerAllReduce

            if PeerAllReduce.supported(size):
                group.peer = PeerAllReduce.setup(rank, size, store, device, pdl)
            elif rank == 0:
                log.info("GPUs without peer access: all-reduces go through NCCL only")
        return group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            with _labelled():
                if self.peer is not None and self.peer.can_run(x):
                    return self.peer(x)
                self.pg.allreduce([x]).wait()
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (in place)."""
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            with _labelled():
                self.pg.broadcast([x], opts).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's shard along the last dim on rank 0; other ranks get None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        with _labelled():
            self.pg.gather([parts] if self.rank == 0 else [], [x], opts).wait()
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        if self.pg is not None and hasattr(self.pg, "shutdown"):
            self.pg.shutdown()
        self.pg = self.store = None


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"tensor_parallel_size={d} must divide {what} ({n})")
    return n // d
