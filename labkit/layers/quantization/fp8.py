"""FP8 numerics: float8_e4m3fn values times float32 scales, and the reference FP8 GEMM.

A weight is stored as `q` [N, K] in float8_e4m3fn with scales either per output row ([N]) or per
block of rows and columns ([ceil(N / bn), ceil(K / bk)]); its value is q * scale. Inputs are
quantized on the fly with a scale per row ("token"), per row and group of columns ("group", the
block-wise checkpoints' scheme, groups as wide as a weight block) or one for the whole input
("tensor"), each scale being the amax of what it covers over 448, float8_e4m3fn's largest value.
An input quantized per token ahead of its matmul (by the RMSNorm in front of it) travels as an
Fp8Input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# An all-zero row gets this scale instead of 0, so that quantizing it divides by something.
MIN_SCALE = 1e-12


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to float8_e4m3fn (scale broadcast against x), saturating at +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def amax_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


@dataclass(frozen=True)
class Fp8Input:
    """A matmul's input [M, K] already rounded to FP8 per token: `q` float8_e4m3fn, `scale`
    float32 [M, 1] (amax / 448 of each row), `dtype` the dtype it was computed in (and of the
    matmul's output)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda

    def dequantized(self) -> torch.Tensor:
        """q * scale in `dtype`: what the matmul sees of its input."""
        return (self.q.float() * self.scale).to(self.dtype)


def quantize_per_token(x: torch.Tensor) -> Fp8Input:
    """x [M, K] rounded to FP8 with a scale per row."""
    scale = amax_scale(x.abs().amax(dim=-1, keepdim=True))
    return Fp8Input(quantize(x, scale), scale, x.dtype)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale [N]): one scale per output row, amax / 448 (vLLM's dynamic
    FP8 with per-channel weights)."""
    scale = amax_scale(w.abs().amax(dim=1))
    return quantize(w, scale[:, None]), scale


def expand_block_scale(
    scale: torch.Tensor, block: tuple[int, int], shape: torch.Size
) -> torch.Tensor:
    """A block scale [ceil(N / bn), ceil(K / bk)] spread over the [N, K] elements it scales."""
    bn, bk = block
    full = scale.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)
    return full[: shape[0], : shape[1]]


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype
) -> torch.Tensor:
    """The weight's value q * scale in `dtype` (block None: scale is per output row)."""
    s = scale[:, None] if block is None else expand_block_scale(scale, block, q.shape)
    return (q.float() * s).to(dtype)


def fake_quantize_activations(x: torch.Tensor, strategy: str, group: int | None) -> torch.Tensor:
    """x rounded through float8_e4m3fn with dynamic scales (see the module's docstring) and back
    to x's dtype: what an FP8 GEMM sees of its input."""
    if strategy == "tensor":
        scale = amax_scale(x.abs().amax())
        return (quantize(x, scale).float() * scale).to(x.dtype)
    if strategy == "token":
        return quantize_per_token(x).dequantized()
    k = x.shape[-1]
    padded = F.pad(x, (0, -k % group))
    groups = padded.view(*x.shape[:-1], -1, group)
    scale = amax_scale(groups.abs().amax(dim=-1, keepdim=True))
    out = (quantize(groups, scale).float() * scale).view(padded.shape)[..., :k]
    return out.to(x.dtype)


def fp8_linear(
    x: torch.Tensor | Fp8Input,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    block: tuple[int, int] | None,
    activations: str | None,
    activation_group: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequantized(weight).T (+ bias), x first rounded through FP8 as `activations` says
    (None: weight-only, x as it is; an Fp8Input is rounded already): the numerics of an FP8
    GEMM, computed by dequantizing.

    This is the reference every FP8 kernel is checked against (fp8_cuda.py's paths), and the
    path on the CPU and for what those paths do not take."""
    w = dequantize(weight, weight_scale, block, x.dtype)
    if isinstance(x, Fp8Input):
        x = x.dequantized()
    elif activations is not None:
        x = fake_quantize_activations(x, activations, activation_group)
    return F.linear(x, w, bias)
