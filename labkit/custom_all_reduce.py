"""Low-latency all-reduce for small messages over NVLink peer memory (what vLLM calls the custom
all-reduce), with NCCL left to the large ones.

Each rank allocates a staging buffer and a signal pad, publishes their CUDA IPC handles through
the group's rendezvous store, and maps every peer's; the one-shot kernel
(labkit_kernels.one_shot_all_reduce) then sums straight out of the peers' buffers. Set up only
when every pair of GPUs can access each other's memory; `disable_custom_all_reduce=True` keeps
NCCL for everything.
"""
from __future__ import annotations

import torch

from labkit.cuda_ipc import CudaRT

# One-shot beats NCCL (in a CUDA graph, 2 x H200) up to ~512 KiB: 9.5 vs 21 us at 56 KiB, 20.8 vs
# 24.0 us at 448 KiB, but 57.7 vs 41.6 us at 1.8 MiB (benchmarks/results/gpu.md).
MAX_BYTES = 512 << 10
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class PeerAllReduce:
    def __init__(self, rank: int, world: int, store, device: torch.device):
        from labkit_kernels.one_shot_all_reduce import MAX_PROGRAMS
        self.rank, self.world, self.device = rank, world, device
        self.rt = CudaRT()
        self.rt.set_device(device.index)
        self.own = [self.rt.malloc_zeroed(MAX_BYTES), self.rt.malloc_zeroed(MAX_PROGRAMS * world * 4)]
        store.set(f"peer_all_reduce/{rank}", b"".join(self.rt.ipc_handle(p) for p in self.own))
        self.opened: list[int] = []
        bufs, sigs = [], []
        for peer in range(world):
            if peer == rank:
                buf, sig = self.own
            else:
                handles = store.get(f"peer_all_reduce/{peer}")
                buf, sig = (self.rt.ipc_open(handles[i * 64:(i + 1) * 64]) for i in range(2))
                self.opened += [buf, sig]
            bufs.append(buf)
            sigs.append(sig)
        self.buf_ptrs = torch.tensor(bufs, dtype=torch.int64, device=device)
        self.sig_ptrs = torch.tensor(sigs, dtype=torch.int64, device=device)

    @staticmethod
    def supported(world: int) -> bool:
        """Every GPU of the group can read every other's memory (NVLink or PCIe P2P)."""
        rt = CudaRT()
        return all(rt.can_access_peer(a, b) for a in range(world) for b in range(world) if a != b)

    def can_run(self, x: torch.Tensor) -> bool:
        return (x.dtype in DTYPES and x.is_contiguous()
                and x.numel() * x.element_size() <= MAX_BYTES)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from labkit_kernels.one_shot_all_reduce import one_shot_all_reduce
        return one_shot_all_reduce(x, self.buf_ptrs, self.sig_ptrs, self.rank, self.world)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        for ptr in self.opened:
            self.rt.ipc_close(ptr)
        for ptr in self.own:
            self.rt.free(ptr)
        self.opened, self.own = [], []
