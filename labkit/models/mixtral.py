"""Mixtral: Llama/Mistral attention (sliding window when the config sets one) with a mixture of
experts as every layer's feed-forward; the router's top-k weights are always renormalised.

Checkpoints name the block `block_sparse_moe` (experts `w1` gate, `w3` up, `w2` down);
transformers 5 calls it `mlp`. Ours is `mlp` (one decoder layer for every MoE family), and the
checkpoint's name is mapped onto it.
"""

from __future__ import annotations

from torch import nn

from labkit.layers.fused_moe import expert_param_name
from labkit.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from labkit.models.model_config import ModelConfig
from labkit.models.model_parts import ModelParts
from labkit.models.qwen3_moe import make_moe_mlp


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg: ModelConfig, layer_idx: int, parts: ModelParts) -> nn.Module:
        return make_moe_mlp(cfg, layer_idx, parts)


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_cls = MixtralModel

    @staticmethod
    def remap_weight_name(name: str):
        name = name.replace(".block_sparse_moe.", ".mlp.")
        hit = expert_param_name(name)
        if hit is None and ".mlp.gate." in name:
            return name, None  # the router
        return hit
