"""RMSNorm with the residual add fused in: one read of x and residual, one write of each output.

HF semantics, bit for bit: the residual sum is rounded to the activation dtype (it is what the
next layer adds to), the norm is computed in float32 from that rounded sum and cast back before
the weight multiply: `weight * (h.float() * rsqrt(mean(h^2) + eps)).to(dtype)`. One program
normalizes one row (Qwen2.5-7B: 3584 values, 7 KiB in bf16, held in registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_args, pdl_wait


@triton.jit
def _rmsnorm_kernel(
    x,
    residual,
    weight,
    out,
    new_residual,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(x + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (
            h.to(tl.float32)
            + tl.load(residual + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        ).to(x.dtype.element_ty)
        tl.store(new_residual + row * stride_nr + offs, h, mask=mask)
    hf = h.to(tl.float32)
    normed = hf * tl.math.rsqrt(tl.sum(hf * hf, 0) / N + eps)
    w = tl.load(weight + offs, mask=mask, other=0.0).to(tl.float32)
    y = normed.to(x.dtype.element_ty).to(tl.float32) * w
    tl.store(out + row * stride_o + offs, y.to(out.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, pdl: int
):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    assert x2.stride(-1) == 1 and weight.is_contiguous() and weight.shape == (n,)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        assert r2.stride(-1) == 1 and r2.dtype == x.dtype
        new_res = torch.empty_like(out)
    else:
        r2 = new_res = out  # never touched: HAS_RESIDUAL=False compiles the add out
    block = triton.next_power_of_2(n)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            new_res,
            eps,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            new_res.stride(0),
            N=n,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)),
            **pdl_launch_args(pdl),
        )
    return out.view(x.shape), new_res.view(x.shape)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, pdl: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weight * rmsnorm(x + residual), x + residual), both in x's dtype. pdl: the
    launch mode (kernels/pdl.py)."""
    return _launch(x, residual, weight, eps, pdl)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: int = 0) -> torch.Tensor:
    """The no-residual variant (a model's first norm and its final norm)."""
    return _launch(x, None, weight, eps, pdl)[0]


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(dtype)).to(dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rmsnorm_ref(h, weight, eps), h
