"""SiLU-and-mul for the merged gate/up projection: x = [T, 2*I] (gate first) -> silu(gate) * up.

A grid of (token, column block): Qwen2.5-7B's I = 18944 is 19 blocks of 1024 per token, enough
programs even at batch 1. Math in float32, one rounding to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pdl import pdl_launch_args, pdl_wait

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x, out, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + t * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out + t * stride_o + offs, y.to(out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, pdl: int = 0) -> torch.Tensor:
    """x: [T, 2*I] -> [T, I] in x's dtype. pdl: the launch mode (kernels/pdl.py)."""
    t, two_i = x.shape
    i = two_i // 2
    assert two_i == 2 * i and x.stride(-1) == 1
    out = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(i, BLOCK))](
            x,
            out,
            x.stride(0),
            out.stride(0),
            INTER=i,
            BLOCK=BLOCK,
            num_warps=4,
            **pdl_launch_args(pdl),
        )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
