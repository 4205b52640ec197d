"""Mixture-of-experts feed-forward (Qwen3-MoE, Mixtral): a router picks each token's top-k
experts and each expert's SiLU-gated MLP runs on the tokens routed to it.

The experts of a layer are ONE batched weight each: w13 [E, 2 * I, H] (every expert's gate rows,
then its up rows) and w2 [E, H, I]. Checkpoints store them per expert (`experts.{e}.gate_proj`,
`up_proj`, `down_proj`; Mixtral's `w1`, `w3`, `w2`) or already fused (`experts.gate_up_proj`
[E, 2 * I, H], `experts.down_proj` [E, H, I]); `expert_param_name` maps either onto them.
Under tensor parallelism every rank holds a slice of each expert's intermediate dimension
(I / tp gate and up rows, the matching down columns), as vLLM shards by default: each rank's
output is a partial sum, all-reduced once per layer as the dense MLP's is.

On CUDA (KernelSwitches.use_fused_moe) the router's choice is one kernel (labkit.kernels.
moe_route, `route` its reference) and the experts run in labkit.kernels.fused_moe: per-slot
reads for a few tokens, else tokens sorted by expert, one grouped GEMM for gate/up and one for
down. Elsewhere: a torch loop over the
experts that have tokens, the sums in HF's order (expert by expert into zeros).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from labkit.distributed import TPGroup, divide
from labkit.layers.linear import linear
from labkit.layers.switches import KernelSwitches

if TYPE_CHECKING:  # the kernels import triton: only CUDA engines load them
    from labkit.kernels.gemv import GemvWorkspace

# checkpoint projection name -> (our parameter, its shard): Qwen/HF names and Mixtral's.
_EXPERT_SHARDS = {
    "gate_proj": ("w13", 0),
    "w1": ("w13", 0),
    "up_proj": ("w13", 1),
    "w3": ("w13", 1),
    "down_proj": ("w2", None),
    "w2": ("w2", None),
}
_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight$")
_FUSED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)$")


def expert_param_name(name: str) -> tuple[str, tuple[int | None, int | None]] | None:
    """(our parameter's name, (expert or None for all, gate/up half or None)) for a checkpoint
    tensor of experts, None for any other tensor."""
    if m := _PER_EXPERT.match(name):
        param, half = _EXPERT_SHARDS[m.group(3)]
        return f"{m.group(1)}.{param}", (int(m.group(2)), half)
    if m := _FUSED.match(name):
        return f"{m.group(1)}.{'w13' if m.group(2) == 'gate_up_proj' else 'w2'}", (None, None)
    return None


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in `dtype`, expert ids [T, k]): softmax in float32, top-k, and with
    `renormalize` the k weights divided by their sum (as transformers does)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def experts_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_k weight_k * expert_k(x) per token, one expert at a time: x [T, H] -> [T, H]."""
    t, k = topk_ids.shape
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)  # (token, k) slots grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    weights = topk_weights.flatten()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        slots = order[start : start + n]
        start += n
        rows = slots // k
        gate, up = F.linear(x[rows], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * weights[slots, None]
        out.index_add_(0, rows, y)
    return out


class FusedMoE(nn.Module):
    """The experts of one layer, this rank's slice of each; forward(x, router_logits) -> the
    all-reduced output [T, H]."""

    profile_category = "matmul"

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        *,
        tp: TPGroup,
        switches: KernelSwitches,
    ):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.tp, self.switches = tp, switches
        self.inter = divide(intermediate_size, tp.size, "moe intermediate size")
        self.w13 = nn.Parameter(
            torch.empty(num_experts, 2 * self.inter, hidden_size), requires_grad=False
        )
        self.w2 = nn.Parameter(
            torch.empty(num_experts, hidden_size, self.inter), requires_grad=False
        )
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int | None, int | None]
    ) -> None:
        """`loaded`: one expert's gate, up or down weight, or all experts' fused gate/up or down
        (see `expert_param_name`); this rank keeps its slice of the intermediate dimension."""
        expert, half = shard
        i, r = self.inter, self.tp.rank
        dst = param.data if expert is None else param.data[expert]
        if param is self.w2:
            dst.copy_(loaded.narrow(-1, r * i, i))
        elif half is not None:  # one expert's gate (0) or up (1) projection
            dst.narrow(0, half * i, i).copy_(loaded.narrow(0, r * i, i))
        else:  # [E, 2 * I_full, H]: gate rows then up rows, each sliced
            full = loaded.shape[-2] // 2
            for h in (0, 1):
                dst.narrow(-2, h * i, i).copy_(loaded.narrow(-2, h * full + r * i, i))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.switches.use_fused_moe and x.is_cuda:
            from labkit.kernels.fused_moe import fused_moe
            from labkit.kernels.moe_route import moe_route

            pdl = self.switches.pdl
            weights, ids = moe_route(router_logits, self.top_k, self.renormalize, x.dtype, pdl)
            out = fused_moe(x, self.w13, self.w2, weights, ids, pdl=pdl)
        else:
            weights, ids = route(router_logits, self.top_k, self.renormalize, x.dtype)
            out = experts_torch(x, self.w13, self.w2, weights, ids)
        return self.tp.all_reduce(out)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated on every rank) and experts: the feed-forward of a sparse
    layer, named as the checkpoints name it (`mlp.gate`, `mlp.experts`). The router's matmul
    takes the path of every other linear layer (labkit.layers.linear.linear: on CUDA the decode
    kernel for a few rows, launched under PDL like the kernels around it, cuBLAS otherwise)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        *,
        tp: TPGroup,
        switches: KernelSwitches,
        workspace: GemvWorkspace | None = None,
    ):
        super().__init__()
        self.switches, self.workspace = switches, workspace
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.experts = FusedMoE(
            num_experts,
            top_k,
            hidden_size,
            intermediate_size,
            renormalize,
            tp=tp,
            switches=switches,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.gate.weight, switches=self.switches, workspace=self.workspace)
        return self.experts(x, logits)
