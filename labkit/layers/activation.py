"""The MLP's activation: SiLU of the gate times the up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.layers.switches import KernelSwitches


class SiluAndMul(nn.Module):
    """silu(gate) * up, for the merged gate/up projection's output."""

    profile_category = "norm/rope/activation"

    def __init__(self, switches: KernelSwitches):
        super().__init__()
        self.switches = switches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from labkit.kernels.silu_and_mul import silu_and_mul

            return silu_and_mul(x, pdl=self.switches.pdl)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
