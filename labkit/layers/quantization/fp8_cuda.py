"""An FP8 linear layer's product on CUDA: labkit's decode kernel for a decode step's few rows,
torch._scaled_mm (cuBLASLt) for more, and the dequantizing reference (fp8.fp8_linear) where
neither takes the scheme. All three compute fp8_linear's numerics.

  rows <= 16 (kernels/gemv.py, FP8 modes): reads the one-byte weight and its scales as they are
    stored; an input rounded per token or per tensor is quantized first (kernels/fp8_quant.py,
    as for _scaled_mm; per token with the MLP's SiLU-and-mul inside), unless the RMSNorm in
    front of the matmul did it (an Fp8Input arrives); one rounded per group of
    columns inside the kernel; its configuration comes from the card's table (fp8 entries; null
    there: the next path) or a heuristic.
  more rows, per-row weight scales, inputs per token or per tensor: the input is quantized by
    kernels/fp8_quant.py (per token with the MLP's SiLU-and-mul inside), then _scaled_mm with
    row-wise scales (float32 [M, 1] x [1, N]).
  anything else (block weight scales at prefill sizes, weight-only schemes, dimensions that are
    not multiples of 16, a float16 model): the reference. Block scales (1x128 input groups x
    128x128 weight blocks) are not given to _scaled_mm: the torch versions labkit runs on do not
    all take them on sm_90, so prefill dequantizes there (decode does not).

Only imported on CUDA (it imports triton).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from labkit.kernels.fp8_quant import quantize_fp8
from labkit.kernels.gemv import gemv
from labkit.kernels.gemv_configs import choose_config
from labkit.kernels.gemv_tiles import Fp8Operands
from labkit.layers.quantization.fp8 import Fp8Input, amax_scale, fp8_linear
from labkit.layers.quantization.scheme import Fp8Scheme
from labkit.layers.switches import KernelSwitches

if TYPE_CHECKING:
    from labkit.kernels.gemv import GemvWorkspace
    from labkit.layers.activation import SiluAndMul


def fp8_linear_cuda(
    x: torch.Tensor | Fp8Input,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    scheme: Fp8Scheme,
    bias: torch.Tensor | None,
    act: SiluAndMul | None,
    switches: KernelSwitches,
    workspace: GemvWorkspace | None,
) -> torch.Tensor:
    """fp8_linear(act(x), ...) by the fastest path for x's rows (act: the MLP's SiLU-and-mul,
    x then the merged gate/up output; the decode kernel fuses it where its config says so).
    An Fp8Input (rounded per token by the norm in front) goes to the kernels as it is."""
    n, k = weight.shape
    plain = isinstance(x, Fp8Input) or (x.dim() == 2 and x.stride(1) == 1)
    group = scheme.activation_group if scheme.activations == "group" else None
    if switches.use_gemv and plain and (group is None or group & (group - 1) == 0):
        cfg = choose_config(x.shape[0], n, k, x.device, fp8=True)
        if cfg is not None:
            if group is not None and cfg.block_k % group:  # a tile holds whole groups
                cfg = dataclasses.replace(cfg, block_k=max(cfg.block_k, group))
            operands = Fp8Operands(weight_scale, scheme.block, scheme.activations, group)
            if operands.quantized_input:
                xq, x_scale = quantize_input(x, scheme.activations, switches.pdl, act)
                operands = dataclasses.replace(operands, input_scale=x_scale, dtype=x.dtype)
                x, act = xq, None
            elif act is not None and not cfg.fuse_act:
                x, act = act(x), None
            return gemv(
                x,
                weight,
                bias,
                gated=act is not None,
                config=cfg,
                workspace=workspace,
                pdl=switches.pdl,
                fp8=operands,
            )
    if (
        plain
        and scheme.block is None
        and scheme.activations in ("token", "tensor")
        and x.dtype == torch.bfloat16
        and k % 16 == 0
        and n % 16 == 0
    ):
        return scaled_mm_linear(
            x, weight, weight_scale, scheme.activations, bias, switches.pdl, act
        )
    if act is not None:
        x = act(x)
    return fp8_linear(
        x,
        weight,
        weight_scale,
        block=scheme.block,
        activations=scheme.activations,
        activation_group=scheme.activation_group,
        bias=bias,
    )


def scaled_mm_linear(
    x: torch.Tensor | Fp8Input,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    activations: str,
    bias: torch.Tensor | None,
    pdl: int = 0,
    act: SiluAndMul | None = None,
) -> torch.Tensor:
    """act(x) (x bf16 [M, K], or [M, 2K] for the MLP's SiLU-and-mul) rounded through FP8 per
    token ("token") or per tensor ("tensor") times the float8 weight [N, K] with per-row scales
    [N], in bf16: cuBLASLt's row-wise scaled GEMM.
    It wants the second operand column-major ([N, K] row-major, transposed) and both scales
    float32; the bias is added after (row-wise scaling does not take every bias dtype)."""
    xq, x_scale = quantize_input(x, activations, pdl, act)
    y = torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=x_scale,
        scale_b=weight_scale.view(1, -1),
        out_dtype=torch.bfloat16,
    )
    return y if bias is None else y + bias


def quantize_input(
    x: torch.Tensor | Fp8Input, activations: str, pdl: int = 0, act: SiluAndMul | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x) rounded to float8 per token ("token") or with one scale for all of it ("tensor"):
    (float8 [M, K], float32 scales [M, 1]). Per token, the MLP's SiLU-and-mul is computed by
    the quantizer as it reads. An Fp8Input is rounded per token already."""
    if isinstance(x, Fp8Input):
        assert activations == "token" and act is None
        return x.q, x.scale
    if activations == "tensor":
        x = act(x) if act is not None else x
        return quantize_fp8(x, amax_scale(x.abs().amax()).reshape(1), pdl)
    return quantize_fp8(x, None, pdl, gated=act is not None)
