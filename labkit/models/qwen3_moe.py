"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with a mixture of experts as the
feed-forward of its sparse layers (every `decoder_sparse_step`-th, except `mlp_only_layers`,
which keep a dense MLP of `intermediate_size`). The router's top-k weights are renormalised
when `norm_topk_prob` says so."""

from __future__ import annotations

from torch import nn

from labkit.layers.fused_moe import SparseMoeBlock, expert_param_name
from labkit.models.llama import LlamaMLP
from labkit.models.model_config import ModelConfig
from labkit.models.model_parts import ModelParts
from labkit.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model


def make_moe_mlp(cfg: ModelConfig, layer_idx: int, parts: ModelParts) -> nn.Module:
    """Layer `layer_idx`'s feed-forward: experts where the config makes it sparse, else dense."""
    if not cfg.is_moe_layer(layer_idx):
        return LlamaMLP(cfg, parts)
    return SparseMoeBlock(
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.norm_topk_prob,
        tp=parts.tp,
        switches=parts.switches,
        workspace=parts.workspace,
    )


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, cfg: ModelConfig, layer_idx: int, parts: ModelParts) -> nn.Module:
        return make_moe_mlp(cfg, layer_idx, parts)


class Qwen3MoeModel(Qwen3Model):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    model_cls = Qwen3MoeModel

    @staticmethod
    def remap_weight_name(name: str):
        """Expert tensors go into the batched expert weights (labkit.layers.fused_moe)."""
        return expert_param_name(name)
