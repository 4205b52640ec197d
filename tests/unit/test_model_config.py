"""ModelConfig reads sliding windows and experts from config.json as transformers decides them:
the config files here are what transformers' own config classes write."""

from __future__ import annotations

import json

import pytest
import transformers as tf

from labkit.models.model_config import ModelConfig

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _ours(hf_config) -> ModelConfig:
    # Through JSON, as a checkpoint's config.json is read.
    return ModelConfig.from_dict(
        json.loads(hf_config.to_json_string()) | {"architectures": [hf_config.architectures[0]]}
    )


def _windows(cfg: ModelConfig) -> list[int | None]:
    return [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)]


@pytest.mark.parametrize(
    "hf_config, windows",
    [
        (
            tf.MistralConfig(sliding_window=16, architectures=["MistralForCausalLM"], **SMALL),
            [16] * 4,
        ),
        (
            tf.MistralConfig(sliding_window=None, architectures=["MistralForCausalLM"], **SMALL),
            [None] * 4,
        ),
        (
            tf.MixtralConfig(sliding_window=8, architectures=["MixtralForCausalLM"], **SMALL),
            [8] * 4,
        ),
        # Qwen: the window needs use_sliding_window, and dense Qwen keeps the first
        # max_window_layers layers full.
        (
            tf.Qwen3Config(sliding_window=16, architectures=["Qwen3ForCausalLM"], **SMALL),
            [None] * 4,
        ),
        (
            tf.Qwen3Config(
                use_sliding_window=True,
                sliding_window=16,
                max_window_layers=2,
                architectures=["Qwen3ForCausalLM"],
                **SMALL,
            ),
            [None, None, 16, 16],
        ),
        (
            tf.Qwen2Config(
                use_sliding_window=True,
                sliding_window=8,
                max_window_layers=3,
                architectures=["Qwen2ForCausalLM"],
                **SMALL,
            ),
            [None, None, None, 8],
        ),
        (
            tf.Qwen3MoeConfig(
                use_sliding_window=True,
                sliding_window=8,
                architectures=["Qwen3MoeForCausalLM"],
                **SMALL,
            ),
            [8] * 4,
        ),
    ],
    ids=[
        "mistral",
        "mistral_no_window",
        "mixtral",
        "qwen3_off",
        "qwen3_upper_layers",
        "qwen2_upper_layers",
        "qwen3_moe",
    ],
)
def test_sliding_window_per_layer(hf_config, windows):
    cfg = _ours(hf_config)
    assert _windows(cfg) == windows
    if getattr(hf_config, "layer_types", None):  # transformers' own per-layer decision
        assert [w is not None for w in windows] == [
            t == "sliding_attention" for t in hf_config.layer_types
        ]


def test_experts_as_transformers_places_them():
    """Qwen3-MoE: sparse every decoder_sparse_step-th layer except mlp_only_layers (transformers
    writes num_experts back as num_local_experts); Mixtral: every layer, always renormalised,
    experts as wide as intermediate_size."""
    hf = tf.Qwen3MoeConfig(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        norm_topk_prob=True,
        architectures=["Qwen3MoeForCausalLM"],
        **SMALL,
    )
    cfg = _ours(hf)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 16)
    assert cfg.norm_topk_prob
    model = tf.Qwen3MoeForCausalLM(hf)
    sparse = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers]
    assert [cfg.is_moe_layer(i) for i in range(4)] == sparse == [False, True, False, False]
    mix = _ours(
        tf.MixtralConfig(num_local_experts=4, architectures=["MixtralForCausalLM"], **SMALL)
    )
    assert (mix.num_experts, mix.moe_intermediate_size, mix.norm_topk_prob) == (4, 64, True)
    assert all(mix.is_moe_layer(i) for i in range(4))
    dense = _ours(tf.LlamaConfig(architectures=["LlamaForCausalLM"], **SMALL))
    assert dense.num_experts == 0 and not any(dense.is_moe_layer(i) for i in range(4))


def test_tp_must_split_the_experts(tmp_path):
    """Each rank holds a slice of every expert's intermediate dimension: a size that does not
    split is refused when the config is resolved, before any worker starts."""
    from labkit import EngineConfig
    from labkit.engine.resolved_config import resolve

    hf = tf.Qwen3MoeConfig(
        num_experts=4, moe_intermediate_size=33, architectures=["Qwen3MoeForCausalLM"], **SMALL
    )
    (tmp_path / "config.json").write_text(hf.to_json_string())
    options = dict(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True, device="cpu")
    assert resolve(EngineConfig.from_kwargs(**options)).model_config.num_experts == 4
    with pytest.raises(ValueError, match="experts' intermediate size"):
        resolve(EngineConfig.from_kwargs(tensor_parallel_size=2, **options))
