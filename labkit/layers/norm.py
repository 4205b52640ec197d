"""RMSNorm, with the residual add fused in; QKNorm, the per-head norms of q and k (Qwen3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labkit.layers.switches import KernelSwitches


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, with the residual add fused in (returns the new residual)."""

    profile_category = "norm/rope/activation"

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, switches: KernelSwitches):
        super().__init__()
        self.eps, self.switches = eps, switches
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:  # one fused Triton kernel instead of ~8 elementwise launches
            from labkit.kernels.fused_add_rmsnorm import fused_add_rmsnorm, rmsnorm

            if residual is None:
                return rmsnorm(x, self.weight, self.eps, self.switches.pdl)
            return fused_add_rmsnorm(x, residual, self.weight, self.eps, self.switches.pdl)
        if residual is not None:
            x = x + residual
            residual = x
        # HF's order (normalise in float32, cast, then scale); F.rms_norm is one fused CPU kernel
        # where the spelled-out form was five, with the same float32 result.
        out = self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return out if residual is None else (out, residual)


@dataclass(frozen=True)
class QKNorm:
    """RMSNorms over each query head and each key head before rotary (Qwen3), their weights
    [head_dim] shared by the heads. The attention backend applies them: the Triton one inside its
    rotary and cache-write kernel, with q's epsilon for both (a model has one)."""

    q: RMSNorm
    k: RMSNorm
