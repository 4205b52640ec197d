"""Fp8LinearMethod: what a tensor-parallel linear layer hands its FP8 weights to.

The layer keeps `weight` (float8_e4m3fn [N, K], this rank's rows or columns) and `weight_scale`
(float32): per output row [N] for per-channel and per-tensor checkpoints (a tensor's one scale is
written into every row it covers, so merged q/k/v or gate/up parts each keep their own scale
exactly, with no requantization), or per block [ceil(N / bn), ceil(K / bk)]. Under tensor
parallelism the scales shard with their weights: per-row scales with the rows of column-parallel
layers and whole on row-parallel ones; block scales by whole blocks, rows or columns (a split
inside a block is refused before any weight loads, see labkit.models.fp8_sharding).
Float weights (`quantization="fp8"` on a float checkpoint) load as usual and are quantized per
output row after loading. The forward runs fp8_cuda's kernels on CUDA, the dequantizing reference
(fp8.fp8_linear) elsewhere.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from labkit.distributed import TPGroup
from labkit.layers.quantization.fp8 import FP8, Fp8Input, fp8_linear, quantize_per_channel
from labkit.layers.quantization.scheme import Fp8Scheme

if TYPE_CHECKING:
    from labkit.layers.activation import SiluAndMul


class Fp8LinearMethod:
    def __init__(self, scheme: Fp8Scheme):
        self.scheme = scheme

    @property
    def takes_fp8_input(self) -> bool:
        """Whether the input is rounded per token, so that the RMSNorm in front may hand it
        over as an Fp8Input (quantized as it is normalized)."""
        return self.scheme.activations == "token"

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        """`layer.weight` (and for FP8 checkpoints `layer.weight_scale`), to be loaded."""
        if not self.scheme.serialized:
            layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
            return
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8), requires_grad=False
        )
        if self.scheme.block is None:
            shape = (out_features,)
        else:
            bn, bk = self.scheme.block
            shape = (math.ceil(out_features / bn), math.ceil(in_features / bk))
        layer.weight_scale = nn.Parameter(
            torch.empty(shape, dtype=torch.float32), requires_grad=False
        )

    def load_scale(
        self,
        param: nn.Parameter,
        loaded: torch.Tensor,
        tp: TPGroup,
        rows: tuple[int, int] | None,
        split_columns: bool,
    ) -> None:
        """Copy this rank's share of the checkpoint scale `loaded` into `param`.

        rows: (offset, size) of the part `loaded` scales within this rank's output rows, which
        hold this rank's `size` rows of the part (column-parallel); None: the layer's output
        rows are whole (row-parallel). split_columns: the input features are split over the
        ranks (row-parallel), so block scales keep this rank's block columns."""
        if param.dim() == 1:  # per output row
            loaded = loaded.reshape(-1)
            if rows is None:
                param.data.copy_(loaded.expand(param.shape[0]))
            else:
                offset, size = rows
                if loaded.numel() == 1:  # per tensor: every row of the part has it
                    loaded = loaded.expand(size * tp.size)
                param.data.narrow(0, offset, size).copy_(loaded.narrow(0, tp.rank * size, size))
            return
        dst = param.data
        if rows is not None:
            bn = self.scheme.block[0]
            offset, size = rows
            if offset % bn or (tp.size > 1 and size % bn):
                raise ValueError(
                    f"a part of {size} rows at row {offset} (tensor_parallel_size={tp.size}) "
                    f"does not start and end on the {bn}-row boundaries of its FP8 scale blocks"
                )
            blocks = math.ceil(size / bn)
            dst = dst.narrow(0, offset // bn, blocks)
            loaded = loaded.narrow(0, tp.rank * blocks, blocks)
        if split_columns:
            loaded = loaded.narrow(1, tp.rank * dst.shape[1], dst.shape[1])
        dst.copy_(loaded)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Float weights become FP8 here, one scale per output row."""
        if self.scheme.serialized:
            return
        q, scale = quantize_per_channel(layer.weight.data)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor | Fp8Input,
        bias: torch.Tensor | None,
        act: SiluAndMul | None = None,
    ) -> torch.Tensor:
        """act(x) @ the weight's value.T (+ bias), act: the MLP's SiLU-and-mul or None. On CUDA
        by fp8_cuda's kernels (the layer's switches and workspace say which may run), elsewhere
        by dequantizing."""
        s = self.scheme
        if x.is_cuda:
            from labkit.layers.quantization.fp8_cuda import fp8_linear_cuda

            return fp8_linear_cuda(
                x, layer.weight, layer.weight_scale, s, bias, act, layer.switches, layer.workspace
            )
        if act is not None:
            x = act(x)
        return fp8_linear(
            x,
            layer.weight,
            layer.weight_scale,
            block=s.block,
            activations=s.activations,
            activation_group=s.activation_group,
            bias=bias,
        )
