"""The checkpoint's architecture, read from config.json into one plain dataclass.

Read from the JSON directly (not via transformers' config classes), so that config files written
by any transformers version load the same way (`rope_scaling` vs v5's `rope_parameters`,
Qwen3-MoE's `num_experts` written back as `num_local_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str
    eos_token_id: list[int]
    bos_token_id: int | None
    # Sliding-window attention: a query sees itself and the `sliding_window - 1` tokens before it
    # (HF's mask), on the layers `layer_types` marks "sliding_attention".
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    # Mixture of experts (0 experts: a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities
    decoder_sparse_step: int = 1  # every n-th layer is sparse ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... except these (dense MLP)

    def layer_window(self, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx`, None for full attention."""
        if self.sliding_window is None or self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has experts (Qwen3-MoE's rule; Mixtral: every layer)."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        arch = (d.get("architectures") or ["?"])[0]
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        layers = d["num_hidden_layers"]
        window, layer_types = _sliding_window(arch, d, layers)
        mixtral = arch == "MixtralForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta") or rope.get("rope_theta", 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases; Llama has them when attention_bias says so.
            attention_bias=d.get("attention_bias", arch.startswith("Qwen2")),
            torch_dtype=str(dtype).replace("torch.", ""),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            bos_token_id=d.get("bos_token_id"),
            sliding_window=window,
            layer_types=layer_types,
            num_experts=d.get("num_experts") or d.get("num_local_experts") or 0,
            num_experts_per_tok=d.get("num_experts_per_tok") or 0,
            # Mixtral's experts are intermediate_size wide; it has no dense MLP.
            moe_intermediate_size=d.get("moe_intermediate_size") or d["intermediate_size"],
            # Mixtral always renormalises the top-k weights (its config has no switch for it).
            norm_topk_prob=True if mixtral else bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=d.get("decoder_sparse_step") or 1,
            mlp_only_layers=list(d.get("mlp_only_layers") or []),
        )


def _sliding_window(arch: str, d: dict, layers: int) -> tuple[int | None, list[str]]:
    """(window, per-layer attention types), as transformers decides them: Qwen configs switch
    the window on with `use_sliding_window` (off by default), and dense Qwen models keep full
    attention below `max_window_layers`; Mistral and Mixtral apply `sliding_window` to every
    layer when it is set. An explicit `layer_types` list wins."""
    window = d.get("sliding_window")
    if arch.startswith("Qwen") and not d.get("use_sliding_window", False):
        window = None
    if not window:
        return None, ["full_attention"] * layers
    if d.get("layer_types"):
        return window, list(d["layer_types"])
    first = d.get("max_window_layers", 0) if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") else 0
    return window, ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
