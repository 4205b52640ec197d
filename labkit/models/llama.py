"""The Llama family (Llama-2/3, Mistral with its sliding window, SmolLM2) and Qwen2/Qwen2.5
(q/k/v biases); the base classes of the other decoder-only families (qwen3, qwen3_moe, mixtral).

Parameter names follow the HF checkpoints, so loading is a name lookup; q/k/v and gate/up are
merged into one matmul each (`packed_modules` says how checkpoint names map onto them).
A family that differs in one part overrides one hook: the attention class of its decoder layer
(`attention_cls`), the MLP it builds for a layer (`make_mlp`), the layer class of its model
(`layer_cls`) or the model class of its causal LM (`model_cls`).

Every class takes its engine's ModelParts (TP group, kernel switches, gemv workspace) and hands
them down to the layers; the forward takes the step's AttentionInputs down to each attention
layer.
"""

from __future__ import annotations

import torch
from torch import nn

from labkit.layers.activation import SiluAndMul
from labkit.layers.attention import Attention, AttentionInputs
from labkit.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from labkit.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from labkit.layers.norm import QKNorm, RMSNorm
from labkit.layers.quantization.fp8 import Fp8Input
from labkit.layers.rotary import RotaryEmbedding
from labkit.models.model_config import ModelConfig
from labkit.models.model_parts import ModelParts


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, parts: ModelParts
    ):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=cfg.attention_bias,
            **parts.linear_args(),
        )
        h, hkv, d = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = h * d, hkv * d
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * d, cfg.hidden_size, **parts.linear_args()
        )
        self.attn = Attention(layer_idx, h, hkv, d, rotary, cfg.layer_window(layer_idx))

    # Norms over each q and k head before rotary (Qwen3 sets them), applied by the attention
    # backend: the Triton one does it inside its rotary kernel, with no launch of its own.
    qk_norm: QKNorm | None = None

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor | Fp8Input, attn: AttentionInputs
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t, d = q.shape[0], self.attn.head_dim
        o = self.attn(
            positions, q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d), attn, self.qk_norm
        )
        return self.o_proj(o.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: ModelParts):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, **parts.linear_args()
        )
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, **parts.linear_args()
        )
        self.act = SiluAndMul(parts.switches)

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x), act=self.act)


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, parts: ModelParts
    ):
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx, rotary, parts)
        self.mlp = self.make_mlp(cfg, layer_idx, parts)
        # Where the matmul after a norm rounds its input to FP8 per token, the norm does it.
        self.input_layernorm = RMSNorm(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            switches=parts.switches,
            fp8_output=self.self_attn.qkv_proj.takes_fp8_input,
        )
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            switches=parts.switches,
            fp8_output=isinstance(self.mlp, LlamaMLP) and self.mlp.gate_up_proj.takes_fp8_input,
        )

    def make_mlp(self, cfg: ModelConfig, layer_idx: int, parts: ModelParts) -> nn.Module:
        """The feed-forward block of layer `layer_idx` (the MoE families build experts here)."""
        return LlamaMLP(cfg, parts)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionInputs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, cfg: ModelConfig, parts: ModelParts):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp=parts.tp)
        # One rotary table for all layers (it is a buffer; sharing saves memory).
        rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.layers = nn.ModuleList(
            self.layer_cls(cfg, i, rotary, parts) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, switches=parts.switches)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, attn)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    model_cls: type[LlamaModel] = LlamaModel
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, parts: ModelParts):
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg, parts)
        # Float, as vLLM leaves it: FP8 checkpoints store the LM head unquantized.
        self.lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, **parts.linear_args(quantized=False)
        )
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs
    ) -> torch.Tensor:
        """Final hidden states [T, hidden]; `attn`: this step's backend, metadata and caches."""
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)
