"""RMSNorm, with the residual add fused in; QKNorm, the per-head norms of q and k (Qwen3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labkit.layers.quantization.fp8 import Fp8Input, quantize_per_token
from labkit.layers.switches import KernelSwitches


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, with the residual add fused in (returns the new residual).

    `fp8_output`: the matmul it feeds rounds its input to FP8 per token, so the output is
    returned as that Fp8Input (on CUDA rounded by the norm's own kernel, in the same pass)."""

    profile_category = "norm/rope/activation"

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        *,
        switches: KernelSwitches,
        fp8_output: bool = False,
    ):
        super().__init__()
        self.eps, self.switches, self.fp8_output = eps, switches, fp8_output
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:  # one fused Triton kernel instead of ~8 elementwise launches
            return self._forward_cuda(x, residual)
        if residual is not None:
            x = x + residual
            residual = x
        # HF's order (normalise in float32, cast, then scale); F.rms_norm is one fused CPU kernel
        # where the spelled-out form was five, with the same float32 result.
        out = self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        if self.fp8_output:
            out = quantize_per_token(out)
        return out if residual is None else (out, residual)

    def _forward_cuda(self, x: torch.Tensor, residual: torch.Tensor | None):
        from labkit.kernels.fused_add_rmsnorm import fused_add_rmsnorm, rmsnorm, rmsnorm_fp8

        pdl = self.switches.pdl
        if self.fp8_output:
            q, scale, new_residual = rmsnorm_fp8(x, residual, self.weight, self.eps, pdl)
            out = Fp8Input(q, scale, x.dtype)
            return out if residual is None else (out, new_residual)
        if residual is None:
            return rmsnorm(x, self.weight, self.eps, pdl)
        return fused_add_rmsnorm(x, residual, self.weight, self.eps, pdl)


@dataclass(frozen=True)
class QKNorm:
    """RMSNorms over each query head and each key head before rotary (Qwen3), their weights
    [head_dim] shared by the heads. The attention backend applies them: the Triton one inside its
    rotary and cache-write kernel, with q's epsilon for both (a model has one)."""

    q: RMSNorm
    k: RMSNorm
