"""RMSNorm with the residual add fused in: one read of x and residual, one write of each output.

HF semantics, bit for bit: the residual sum is rounded to the activation dtype (it is what the
next layer adds to), the norm is computed in float32 from that rounded sum and cast back before
the weight multiply: `weight * (h.float() * rsqrt(mean(h^2) + eps)).to(dtype)`. One program
normalizes one row (Qwen2.5-7B: 3584 values, 7 KiB in bf16, held in registers).

`fp8=True` writes the normalized row rounded to float8_e4m3fn with its per-row scale instead
(what kernels/fp8_quant.py would make of the output, bit for bit), for an FP8 matmul that
quantizes its input per token: the row is in registers already, so its amax costs nothing,
and the quantizer's launch and its read of the row disappear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv_tiles import FP8_MAX, amax_scale
from .pdl import pdl_launch_args, pdl_wait


@triton.jit
def _rmsnorm_kernel(
    x,
    residual,
    weight,
    out,
    new_residual,
    scale,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FP8_OUT: tl.constexpr,
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
    y = (normed.to(x.dtype.element_ty).to(tl.float32) * w).to(x.dtype.element_ty)
    if FP8_OUT:
        yf = y.to(tl.float32)
        s = amax_scale(tl.max(tl.abs(yf), 0))
        tl.store(scale + row, s)
        y = tl.clamp(yf / s, -FP8_MAX, FP8_MAX)
    tl.store(out + row * stride_o + offs, y.to(out.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    pdl: int,
    fp8: bool,
):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    assert x2.stride(-1) == 1 and weight.is_contiguous() and weight.shape == (n,)
    out = torch.empty(x2.shape, dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device) if fp8 else None
    if residual is not None:
        r2 = residual.reshape(-1, n)
        assert r2.stride(-1) == 1 and r2.dtype == x.dtype
        new_res = torch.empty_like(x2)
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
            out if scale is None else scale,  # never touched without FP8_OUT
            eps,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            new_res.stride(0),
            N=n,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            FP8_OUT=fp8,
            num_warps=min(16, max(1, block // 512)),
            **pdl_launch_args(pdl),
        )
    return out, scale, new_res.view(x.shape)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, pdl: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weight * rmsnorm(x + residual), x + residual), both in x's dtype. pdl: the
    launch mode (kernels/pdl.py)."""
    out, _, new_res = _launch(x, residual, weight, eps, pdl, fp8=False)
    return out.view(x.shape), new_res


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: int = 0) -> torch.Tensor:
    """The no-residual variant (a model's first norm and its final norm)."""
    return _launch(x, None, weight, eps, pdl, fp8=False)[0].view(x.shape)


def rmsnorm_fp8(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    pdl: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(float8_e4m3fn [M, N], float32 scales [M, 1], x + residual or None): the norm's output
    (as fused_add_rmsnorm or rmsnorm computes it; residual None: no add) quantized per row, as
    quantize_fp8(out) would. x: [M, N]."""
    q, scale, new_res = _launch(x, residual, weight, eps, pdl, fp8=True)
    return q, scale, None if residual is None else new_res


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
