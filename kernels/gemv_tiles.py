"""The operand tiles of the decode matmul's two loops (gemv.py): the input tile (gated, rounded
through FP8) and the weight tile (prefetched, scaled), and the FP8 modes that select what is done
to them.

An FP8 weight is float8_e4m3fn [N, K] with float32 scales per output row ([N]) or per block
([ceil(N / bn), ceil(K / bk)]); its input is rounded through float8_e4m3fn with dynamic scales as
labkit.layers.quantization.fp8 defines them: per row or for the whole input before the call
(kernels/fp8_quant.py; the kernels read the float8 input and its per-row scales), or per row and
group of columns inside the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The FP8 modes (constexpr arguments of both kernels; 0: a float weight, the input as it is).
# W_SCALE: a float32 scale per weight row, or per SCALE_BN x SCALE_BK block.
W_ROW, W_BLOCK = tl.constexpr(1), tl.constexpr(2)
# ACT: the input arrives quantized (float8, a float32 scale per row: "token" and "tensor"), or is
# rounded through FP8 here with a scale per row and ACT_GROUP columns ("group").
A_QUANTIZED, A_GROUP = tl.constexpr(1), tl.constexpr(2)
ACTIVATIONS = {None: 0, "token": 1, "tensor": 1, "group": 2}
FP8_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(1e-12)  # an all-zero row's scale (as fp8.py's)


@triton.jit
def x_tile(x, m, kk, M, K, stride_xm, GATED: tl.constexpr):
    """Rows m, columns kk of the layer's input, in float32 (broadcast shapes; a quantized input's
    float8 values as they are). GATED: x is the merged [gate | up] output and the input is
    silu(gate) * up, rounded to x's dtype."""
    v = x_load(x, m, kk, M, K, stride_xm, 0).to(tl.float32)
    if GATED:
        up = x_load(x, m, kk, M, K, stride_xm, K).to(tl.float32)
        v = (v * tl.sigmoid(v) * up).to(x.dtype.element_ty).to(tl.float32)
    return v


@triton.jit
def x_load(x, m, kk, M, K, stride_xm, offset):
    """Rows m, columns offset + kk of x as stored (zeros past M rows and K columns)."""
    ok = (kk < K) & (kk * 0 + m < M)  # m < M as a tensor of kk's shape: m may be a plain int
    return tl.load(x + m * stride_xm + offset + kk, mask=ok, other=0.0)


@triton.jit
def amax_scale(amax):
    return tl.maximum(amax / FP8_MAX, MIN_SCALE)


@triton.jit
def fp8_round(v, s, dtype: tl.constexpr):
    """v / s rounded to float8_e4m3fn (saturating), times s, rounded to the input's dtype."""
    q = tl.clamp(v / s, -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
    return (q.to(tl.float32) * s).to(dtype).to(tl.float32)


@triton.jit
def x_in(
    x,
    m,
    kk,
    M,
    K,
    stride_xm,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    ACT_GROUP: tl.constexpr,
    K_AXIS: tl.constexpr,
):
    """The input tile as the product takes it: `x_tile`, its groups rounded through FP8 (each
    group's scale from the tile, which holds whole groups) where ACT says so. A quantized input's
    row scales wait for `input_row_scales`' product with the sums."""
    v = x_tile(x, m, kk, M, K, stride_xm, GATED)
    if ACT == A_GROUP:
        if K_AXIS == 1:
            g = tl.reshape(v, [v.shape[0], v.shape[1] // ACT_GROUP, ACT_GROUP])
        else:
            g = tl.reshape(v, [v.shape[0] // ACT_GROUP, ACT_GROUP, v.shape[1]])
        s = amax_scale(tl.max(tl.abs(g), K_AXIS + 1, keep_dims=True))
        v = tl.reshape(fp8_round(g, s, x.dtype.element_ty), [v.shape[0], v.shape[1]])
    return v


@triton.jit
def input_row_scales(x_scale, m, M):
    """The float32 scales of a quantized input's rows m (zero past M)."""
    return tl.load(x_scale + m, mask=m < M, other=0.0)


@triton.jit
def w_in(
    w_cur,
    w_scale,
    rows,
    row_ok,
    kk,
    K,
    stride_sn,
    W_SCALE: tl.constexpr,
    SCALE_BN: tl.constexpr,
    SCALE_BK: tl.constexpr,
):
    """The weight tile (columns kk) as the product takes it: as loaded, or with block scales
    times each element's scale, in float32 (per-row scales wait for `row_scaled`)."""
    if W_SCALE == W_BLOCK:
        p = w_scale + (rows // SCALE_BN)[:, None] * stride_sn + (kk // SCALE_BK)[None, :]
        s = tl.load(p, mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
        return w_cur.to(tl.float32) * s
    else:
        return w_cur


@triton.jit
def row_scaled(part, w_scale, rows, row_ok, W_SCALE: tl.constexpr):
    if W_SCALE == W_ROW:
        part = part * tl.load(w_scale + rows, mask=row_ok, other=0.0)[:, None]
    return part


@triton.jit
def weight_tile(w_ptr, k0, k_end, K, row_ok, cols, SPLIT: tl.constexpr):
    """The weight tile at k0 (zeros past K). SPLIT: only if k0 is still inside this program's
    slice of K (which ends at k_end), else zeros and no loads."""
    # Masked per element, but K is a multiple of 16 in every real model (Triton specialises on
    # it), so the mask is uniform over each 16-byte vector: the loads stay wide.
    in_k = k0 + cols < K
    if SPLIT:  # (a vector compare: the interpreter's & mistypes scalars)
        in_k = in_k & (cols * 0 + k0 < k_end)
    return tl.load(w_ptr + k0, mask=row_ok[:, None] & in_k[None, :], other=0.0)


@triton.jit
def block_scale_column(
    w_scale, rows, row_ok, k0, stride_sn, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr
):
    """[BLOCK_N] block scales of the tile whose columns start at k0 (inside one scale block)."""
    p = w_scale + (rows // SCALE_BN) * stride_sn + k0 // SCALE_BK
    return tl.load(p, mask=row_ok, other=0.0)


@dataclass(frozen=True)
class Fp8Operands:
    """What a float8_e4m3fn weight brings to the product: its scales (float32 [N] per row, or
    [ceil(N / bn), ceil(K / bk)] per `block` (bn, bk)), and how the input is rounded:
    `activations` "token" or "tensor" (the input arrives quantized by kernels/fp8_quant.py:
    float8 [M, K] with `input_scale`, float32 [M, 1], and the product is returned in `dtype`, the
    input's dtype before quantizing), "group" (`group` columns, a power of 2 dividing the tile's
    columns, rounded in the kernel) or None (weight-only: the input as it is)."""

    weight_scale: torch.Tensor
    block: tuple[int, int] | None
    activations: str | None
    group: int | None = None
    input_scale: torch.Tensor | None = None
    dtype: torch.dtype | None = None

    @property
    def quantized_input(self) -> bool:
        return self.activations in ("token", "tensor")


def fp8_tensor_cores(fp8: Fp8Operands | None, dtype: torch.dtype, block_k: int) -> bool:
    """Whether the tensor-core loop multiplies in FP8 (the weight's and the quantized input's
    bytes as they are): for a half-precision product (`dtype`) of a quantized input, and tiles
    inside the weight's scale blocks. A float32 product (exact-token runs) keeps float products:
    FP8 tensor cores accumulate with fewer bits than float32 has."""
    if fp8 is None or not fp8.quantized_input or dtype == torch.float32:
        return False
    return fp8.block is None or fp8.block[1] % block_k == 0


def fp8_modes(fp8: Fp8Operands | None, block_k: int) -> dict:
    """The kernels' FP8 constexpr arguments for `fp8` (None: a float weight) and a tile of
    block_k columns."""
    if fp8 is None:
        return dict(W_SCALE=0, SCALE_BN=1, SCALE_BK=1, ACT=0, ACT_GROUP=1)
    group = fp8.group or 1
    if fp8.activations == "group":
        assert group & (group - 1) == 0 and block_k % group == 0, (group, block_k)
    bn, bk = fp8.block or (1, 1)
    return dict(
        W_SCALE=W_ROW.value if fp8.block is None else W_BLOCK.value,
        SCALE_BN=bn,
        SCALE_BK=bk,
        ACT=ACTIVATIONS[fp8.activations],
        ACT_GROUP=group,
    )
