"""The input of an FP8 GEMM rounded to float8_e4m3fn, for torch._scaled_mm's prefill-sized
products: a scale per row (the row's amax over 448, as labkit.layers.quantization.fp8 defines
it) or one given scale for the whole input. One program per row; two passes over it (the amax,
then the rounding), so nothing but the float8 copy and the scales is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv_tiles import FP8_MAX, amax_scale
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
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    xr = x + row * stride_xm
    pdl_wait(USE_PDL)
    if PER_ROW:
        a = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(xr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            a = tl.maximum(a, tl.abs(v))
        s = amax_scale(tl.max(a, 0))
        tl.store(scale + row, s)
    else:
        s = tl.load(scale)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + cols < K
        v = tl.load(xr + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.clamp(v / s, -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        tl.store(q + row * stride_qm + k0 + cols, r, mask=ok)


def quantize_fp8(
    x: torch.Tensor, scale: torch.Tensor | None = None, pdl: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] with unit last stride. Returns (float8_e4m3fn [M, K], float32 scales [M, 1]):
    x / scale saturated at +-448, with a scale per row (scale None) or the given one-element
    `scale` for every row."""
    m, k = x.shape
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
