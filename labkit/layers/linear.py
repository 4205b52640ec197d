"""Linear layers that shard themselves over the tensor-parallel ranks (Megatron style).

Column-parallel layers split their output features; row-parallel layers split their input
features and all-reduce the partial sums. Each parameter carries a `weight_loader` that takes the
full checkpoint tensor and keeps this rank's slice, so loading is the same for any TP size.
After loading, `process_weights_after_loading` (vLLM's name for the step) lays a CPU float32
weight out once for oneDNN; the forward then multiplies with it directly. On CUDA a decode step's
few rows go through labkit.kernels.gemv where its table (or, up to 2 rows, its heuristic) says
so, cuBLAS otherwise; the engine's KernelSwitches say whether the kernel may be used
(`LABKIT_GEMV=0` turns it off, to measure what it gives), and its GemvWorkspace holds the
kernel's split-K partials.

Every layer takes its engine's TPGroup, switches and workspace when it is built and keeps them,
and its FP8 scheme if the engine quantizes (`quant`): the layer then hands its weights, their
scales and its matmul to labkit.layers.quantization's Fp8LinearMethod. Such a layer whose
input is rounded per token (`takes_fp8_input`) also takes it as an Fp8Input, rounded by the
RMSNorm in front of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from labkit.distributed import TPGroup, divide
from labkit.layers.activation import SiluAndMul
from labkit.layers.quantization.fp8 import Fp8Input
from labkit.layers.quantization.linear_method import Fp8LinearMethod
from labkit.layers.quantization.scheme import Fp8Scheme
from labkit.layers.switches import KernelSwitches

if TYPE_CHECKING:  # the kernels import triton: only CUDA engines load them
    from labkit.kernels.gemv import GemvWorkspace


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: SiluAndMul | None = None,
    *,
    switches: KernelSwitches,
    workspace: GemvWorkspace | None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) by the fastest path for x's rows. `act`: the MLP's SiLU-and-mul, to
    apply to x first (x is then the merged gate/up output); the decode kernel fuses it where its
    configuration says so (`fuse_act`), else it runs first. `switches.use_gemv` allows the decode
    kernel, whose split-K configurations keep their partials in `workspace`."""
    if switches.use_gemv and x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        from labkit.kernels.gemv import gemv
        from labkit.kernels.gemv_configs import choose_config

        cfg = choose_config(x.shape[0], weight.shape[0], weight.shape[1], x.device)
        if cfg is not None:
            if act is not None and not cfg.fuse_act:
                x, act = act(x), None
            return gemv(
                x,
                weight,
                bias,
                gated=act is not None,
                config=cfg,
                workspace=workspace,
                pdl=switches.pdl,
            )
    if act is not None:
        x = act(x)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class _ParallelLinear(nn.Module):
    profile_category = "matmul"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        shard_dim: int | None,
        tp: TPGroup,
        switches: KernelSwitches,
        workspace: GemvWorkspace | None,
        quant: Fp8Scheme | None,
    ):
        super().__init__()
        self.tp, self.switches, self.workspace = tp, switches, workspace
        self.shard_dim = shard_dim
        self.quant = None if quant is None else Fp8LinearMethod(quant)
        if self.quant is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        else:
            self.quant.create_weights(self, out_features, in_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        for p in self.parameters():
            p.weight_loader = self.weight_loader

    @property
    def takes_fp8_input(self) -> bool:
        """Whether forward also takes its input as an Fp8Input (rounded per token)."""
        return self.quant is not None and self.quant.takes_fp8_input

    def _is_scale(self, param: nn.Parameter) -> bool:
        return self.quant is not None and param is getattr(self, "weight_scale", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        dim = self.shard_dim
        if self._is_scale(param):
            rows = (0, self.weight.shape[0]) if dim == 0 else None
            self.quant.load_scale(param, loaded, self.tp, rows, split_columns=dim == 1)
            return
        if dim is not None and not (dim == 1 and param.dim() == 1):  # row-parallel bias is whole
            size = param.shape[dim]
            loaded = loaded.narrow(dim, self.tp.rank * size, size)
        param.data.copy_(loaded)

    def _load_part(self, param: nn.Parameter, loaded: torch.Tensor, offset: int, size: int) -> None:
        """Rows [offset, offset + size) of this rank's output, this rank's slice of one part
        (q, k or v; gate or up) whose full checkpoint tensor (or scale) is `loaded`."""
        if self._is_scale(param):
            self.quant.load_scale(param, loaded, self.tp, (offset, size), split_columns=False)
        else:
            param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp.rank * size, size))

    def process_weights_after_loading(self) -> None:
        """On the CPU in float32, replace the weight by oneDNN's blocked layout of it (same shape,
        no dense copy kept). oneDNN's inner product reads it 1.2-1.6x faster than MKL's sgemm
        reads the dense one at a decode step's 1-32 rows, and as fast at a prefill's thousands
        (PERF_NOTES.md, CPU). GPUs and other dtypes keep the dense weight; FP8 layers leave it
        to their Fp8LinearMethod (float weights are quantized there)."""
        if self.quant is not None:
            self.quant.process_weights_after_loading(self)
            return
        w = self.weight
        if (
            w.device.type == "cpu"
            and w.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
        ):
            # The row count is only a hint for the layout; any number of rows works.
            self.weight = nn.Parameter(
                torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8), requires_grad=False
            )

    def _matmul(
        self,
        x: torch.Tensor | Fp8Input,
        bias: torch.Tensor | None,
        act: SiluAndMul | None = None,
    ) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.apply(self, x, bias, act)
        return linear(x, self.weight, bias, act, switches=self.switches, workspace=self.workspace)


class ColumnParallelLinear(_ParallelLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp: TPGroup,
        switches: KernelSwitches,
        workspace: GemvWorkspace | None,
        quant: Fp8Scheme | None = None,
    ):
        super().__init__(
            in_features,
            divide(out_features, tp.size, "output features"),
            bias,
            0,
            tp,
            switches,
            workspace,
            quant,
        )

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate and up)."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        *,
        tp: TPGroup,
        switches: KernelSwitches,
        workspace: GemvWorkspace | None,
        quant: Fp8Scheme | None = None,
    ):
        self.output_sizes = output_sizes
        super().__init__(
            in_features,
            sum(output_sizes),
            bias,
            tp=tp,
            switches=switches,
            workspace=workspace,
            quant=quant,
        )

    def weight_loader(self, param, loaded, shard_id: int) -> None:
        n = self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // n
        self._load_part(param, loaded, offset, self.output_sizes[shard_id] // n)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul; each rank holds its share of query and key/value heads."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        *,
        tp: TPGroup,
        switches: KernelSwitches,
        workspace: GemvWorkspace | None,
        quant: Fp8Scheme | None = None,
    ):
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size, "num_attention_heads")
        self.num_kv_heads = divide(num_kv_heads, tp.size, "num_key_value_heads")
        super().__init__(
            hidden_size,
            (num_heads + 2 * num_kv_heads) * head_dim,
            bias,
            tp=tp,
            switches=switches,
            workspace=workspace,
            quant=quant,
        )

    def weight_loader(self, param, loaded, shard_id: str) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        self._load_part(param, loaded, offset, size)


class RowParallelLinear(_ParallelLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp: TPGroup,
        switches: KernelSwitches,
        workspace: GemvWorkspace | None,
        quant: Fp8Scheme | None = None,
    ):
        super().__init__(
            divide(in_features, tp.size, "input features"),
            out_features,
            bias,
            1,
            tp,
            switches,
            workspace,
            quant,
        )

    def forward(self, x: torch.Tensor, act: SiluAndMul | None = None) -> torch.Tensor:
        """act: the MLP's SiLU-and-mul, applied to x (the merged gate/up output) first."""
        # The bias is added once, after the sum, not once per rank.
        y = self.tp.all_reduce(self._matmul(x, None, act))
        return y if self.bias is None else y + self.bias
