"""Qwen3 (dense): Llama's layout with an RMSNorm over each query and key head before rotary,
no q/k/v biases, and an explicit head_dim (num_heads * head_dim need not equal hidden_size).

Only the attention differs: the norms are per head (weight [head_dim], shared by all heads), so
tensor parallelism leaves them whole on every rank. The attention backend applies them (QKNorm).
"""

from __future__ import annotations

from labkit.layers.norm import QKNorm, RMSNorm
from labkit.layers.rotary import RotaryEmbedding
from labkit.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from labkit.models.model_config import ModelConfig
from labkit.models.model_parts import ModelParts


class Qwen3Attention(LlamaAttention):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, parts: ModelParts
    ):
        super().__init__(cfg, layer_idx, rotary, parts)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, switches=parts.switches)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, switches=parts.switches)
        self.qk_norm = QKNorm(self.q_norm, self.k_norm)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
