"""Low-latency all-reduce for small messages over NVLink peer memory (what vLLM calls the custom
all-reduce), with NCCL left to the large ones.

Each rank allocates a staging buffer and a signal pad, publishes their CUDA IPC handles through
the group's rendezvous store, and maps every peer's; the one-shot kernel
(labkit.kernels.one_shot_all_reduce) then sums straight out of the peers' buffers. Set up only
when every pair of GPUs can access each other's memory and every rank managed to (a container
may refuse CUDA IPC); otherwise, or with `disable_custom_all_reduce=True`, NCCL does everything.
"""

from __future__ import annotations

import logging

import torch

from labkit.distributed.cuda_ipc import CudaRT

log = logging.getLogger("labkit")

# One-shot beats NCCL (in a CUDA graph, 2 x H200) up to ~512 KiB: 9.5 vs 21 us at 56 KiB, 20.8 vs
# 24.0 us at 448 KiB, but 57.7 vs 41.6 us at 1.8 MiB (dev/results/H200.md).
MAX_BYTES = 512 << 10
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class PeerAllReduce:
    @classmethod
    def setup(
        cls, rank: int, world: int, store, device: torch.device, pdl: int = 0
    ) -> PeerAllReduce | None:
        """Every rank tries; the kernel is used only if all of them succeeded (each rank must
        take the same path, or their collectives would never meet). Else NCCL does everything.
        `pdl`: the kernel's launch mode (labkit.kernels.pdl; 0: off)."""
        peer, error = None, ""
        try:
            peer = cls(rank, world, store, device, pdl)
        except (RuntimeError, OSError) as e:  # OSError: no libcudart to load
            error = str(e) or type(e).__name__
        store.set(f"peer_all_reduce/error/{rank}", error.encode())
        errors = [store.get(f"peer_all_reduce/error/{r}").decode() for r in range(world)]
        failed = next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)
        if failed is None:
            return peer
        if peer is not None:
            peer.close()
        if rank == 0:
            log.warning("peer all-reduce unavailable (%s): all-reduces go through NCCL", failed)
        return None

    def __init__(self, rank: int, world: int, store, device: torch.device, pdl: int = 0):
        from labkit.kernels.one_shot_all_reduce import MAX_PROGRAMS

        self.rank, self.world, self.device, self.pdl = rank, world, device, pdl
        self.own: list[int] = []
        self.opened: list[int] = []
        key = "peer_all_reduce/handles/{}".format
        try:
            self.rt = CudaRT()
            self.rt.set_device(device.index)
            for nbytes in (MAX_BYTES, MAX_PROGRAMS * world * 4):
                self.own.append(self.rt.malloc_zeroed(nbytes))
            handles = b"".join(self.rt.ipc_handle(p) for p in self.own)
        except (RuntimeError, OSError):
            store.set(key(rank), b"")  # the peers must not wait for handles that never come
            self.close()
            raise
        store.set(key(rank), handles)
        bufs, sigs = [], []
        try:
            for peer in range(world):
                if peer == rank:
                    buf, sig = self.own
                else:
                    theirs = store.get(key(peer))
                    if not theirs:
                        raise RuntimeError(f"rank {peer} could not share its buffers")
                    buf = self.rt.ipc_open(theirs[:64])
                    self.opened.append(buf)
                    sig = self.rt.ipc_open(theirs[64:128])
                    self.opened.append(sig)
                bufs.append(buf)
                sigs.append(sig)
        except RuntimeError:
            self.close()
            raise
        self.buf_ptrs = torch.tensor(bufs, dtype=torch.int64, device=device)
        self.sig_ptrs = torch.tensor(sigs, dtype=torch.int64, device=device)

    @staticmethod
    def supported(world: int) -> bool:
        """Every GPU of the group can read every other's memory (NVLink or PCIe P2P)."""
        rt = CudaRT()
        return all(rt.can_access_peer(a, b) for a in range(world) for b in range(world) if a != b)

    def can_run(self, x: torch.Tensor) -> bool:
        return x.dtype in DTYPES and x.is_contiguous() and x.numel() * x.element_size() <= MAX_BYTES

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from labkit.kernels.one_shot_all_reduce import one_shot_all_reduce

        return one_shot_all_reduce(
            x, self.buf_ptrs, self.sig_ptrs, self.rank, self.world, pdl=self.pdl
        )

    def close(self) -> None:
        if self.opened or self.own:
            torch.cuda.synchronize(self.device)
        for ptr in self.opened:
            self.rt.ipc_close(ptr)
        for ptr in self.own:
            self.rt.free(ptr)
        self.opened, self.own = [], []
