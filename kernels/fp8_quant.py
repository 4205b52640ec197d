"""The input of an FP8 GEMM rounded to float8_e4m3fn, for torch._scaled_mm and the decode
matmul: a scale per row (the row's amax over 448, as labkit.layers.quantization.fp8 defines it)
or one given scale for the whole input. One program per row; two passes over it (the amax, then
the rounding), so nothing but the float8 copy and the scales is written. `gated`: the input is
the MLP's merged [gate | up] output and what is quantized is silu(gate) * up (rounded to its
dtype, as silu_and_mul rounds it), computed in each pass: the SiLU-and-mul kernel and its
output's round trip disappear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv_tiles import FP8_MAX, amax_scale, x_tile
from .pdl import pdl_launch_args, pdl_wait


@triton.jit
def _quantize_rows_kernel(
    x,
    q,
    scale,
    K,
    stride_xm,
    stride_qm,
    BLOCK_K: tl.constexpr,
    PER_ROW: tl.constexpr,
    GATED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    pdl_wait(USE_PDL)
    if PER_ROW:
        a = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = x_tile(x, row, k0 + cols, row + 1, K, stride_xm, GATED)
            a = tl.maximum(a, tl.abs(v))
        s = amax_scale(tl.max(a, 0))
        tl.store(scale + row, s)
    else:
        s = tl.load(scale)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + cols < K
        v = x_tile(x, row, k0 + cols, row + 1, K, stride_xm, GATED)
        r = tl.clamp(v / s, -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        tl.store(q + row * stride_qm + k0 + cols, r, mask=ok)


def quantize_fp8(
    x: torch.Tensor, scale: torch.Tensor | None = None, pdl: int = 0, gated: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] with unit last stride (gated: [M, 2K], gate first). Returns (float8_e4m3fn
    [M, K], float32 scales [M, 1]): x (gated: silu(gate) * up) / scale saturated at +-448, with
    a scale per row (scale None) or the given one-element `scale` for every row."""
    m, k = x.shape
    k //= 2 if gated else 1
    assert x.stride(1) == 1
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    per_row = scale is None
    out = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if per_row:
        scale = out
    else:
        assert scale.numel() == 1 and scale.dtype == torch.float32
    if m:
        _quantize_rows_kernel[(m,)](
            x,
            q,
            scale,
            k,
            x.stride(0),
            q.stride(0),
            BLOCK_K=min(2048, triton.next_power_of_2(k)),
            PER_ROW=per_row,
            GATED=gated,
            num_warps=4,
            **pdl_launch_args(pdl),
        )
    if not per_row:
        out.copy_(scale.reshape(1, 1).expand(m, 1))
    return q, out


def quantize_fp8_ref(
    x: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if scale is None:
        scale = (x.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
    scale = scale.float().reshape(-1, 1).expand(x.shape[0], 1)
    q = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale.contiguous()
