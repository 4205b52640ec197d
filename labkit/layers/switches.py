"""KernelSwitches: which optional kernel paths an engine uses, read from the environment once
when its ModelRunner is built and handed to every layer and backend that launches a kernel.

Read per engine, not per process: a notebook that changes `LABKIT_GEMV` or `LABKIT_PDL` between
two `LLM(...)`s gets each engine with the setting it was built under.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelSwitches:
    """use_gemv: decode matmuls may go through labkit.kernels.gemv (`LABKIT_GEMV=0`: cuBLAS
    only). pdl: the programmatic-dependent-launch mode of every labkit kernel launch
    (labkit.kernels.pdl; 0: off). use_fused_moe: MoE layers run their experts in
    labkit.kernels.fused_moe (`LABKIT_FUSED_MOE=0`: a torch loop over the experts).
    use_sampling_kernel: the sampler draws with labkit.kernels.sampling (`LABKIT_SAMPLER=0`:
    torch ops, with a sort for top-k/top-p/min-p). The defaults
    are everything off (plain torch / plain launches), for layers built outside an engine."""

    use_gemv: bool = False
    pdl: int = 0
    use_fused_moe: bool = False
    use_sampling_kernel: bool = False

    @classmethod
    def from_env(cls, device: torch.device, env: Mapping[str, str] = os.environ) -> KernelSwitches:
        """The switches for an engine on `device`; off on anything but CUDA (no kernels run)."""
        if device.type != "cuda":
            return cls()
        from labkit.kernels.pdl import pdl_mode

        return cls(
            use_gemv=env.get("LABKIT_GEMV", "1") != "0",
            pdl=pdl_mode(env.get("LABKIT_PDL", "1"), device),
            use_fused_moe=env.get("LABKIT_FUSED_MOE", "1") != "0",
            use_sampling_kernel=env.get("LABKIT_SAMPLER", "1") != "0",
        )
