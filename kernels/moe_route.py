"""A mixture-of-experts router's choice in one kernel: softmax over the experts in float32, the
k largest probabilities in descending order (the lowest index first among equals), and with
`renormalize` each divided by their sum, cast to the activations' dtype.

In torch that is five launches per layer (softmax, topk, sum, divide, cast), each a few
microseconds of a decode step whose MoE layer reads only ~25 us of weights. One program per
token: a router has at most a few hundred experts, one tile. The torch version, the CPU's path
and this kernel's reference, is labkit.layers.fused_moe.route.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_args, pdl_wait


@triton.jit
def _route_kernel(
    logits,
    weights,
    ids,
    E,
    stride_l,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    x = tl.load(logits + t * stride_l + offs, mask=offs < E, other=-float("inf"))
    x = x.to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(offs < E, p, -1.0)  # below every probability: never chosen
    slots = tl.arange(0, K_PAD)
    top_v = tl.zeros([K_PAD], tl.float32)
    top_i = tl.zeros([K_PAD], tl.int64)
    for j in tl.static_range(TOP_K):
        v = tl.max(p, 0)
        i = tl.min(tl.where(p == v, offs, BLOCK_E), 0)  # the first of equal maxima
        top_v = tl.where(slots == j, v, top_v)
        top_i = tl.where(slots == j, i.to(tl.int64), top_i)
        p = tl.where(offs == i, -1.0, p)
    if RENORMALIZE:
        top_v = top_v / tl.sum(top_v, 0)  # the padding slots hold 0
    keep = slots < TOP_K
    tl.store(weights + t * TOP_K + slots, top_v.to(weights.dtype.element_ty), mask=keep)
    tl.store(ids + t * TOP_K + slots, top_i, mask=keep)


def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    dtype: torch.dtype,
    pdl: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in `dtype`, expert ids [T, k] int64) for router_logits [T, E], as
    labkit.layers.fused_moe.route gives them. pdl: the launch mode (kernels/pdl.py)."""
    t, e = router_logits.shape
    assert router_logits.stride(1) == 1 and 0 < top_k <= e
    weights = torch.empty((t, top_k), dtype=dtype, device=router_logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=router_logits.device)
    if t:
        _route_kernel[(t,)](
            router_logits,
            weights,
            ids,
            e,
            router_logits.stride(0),
            TOP_K=top_k,
            K_PAD=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize,
            BLOCK_E=triton.next_power_of_2(e),
            num_warps=1 if e <= 256 else 4,
            **pdl_launch_args(pdl),
        )
    return weights, ids
