"""Checkpoint formats and the refusals around them: dummy weights from a config alone, sharded
safetensors, pickled *.bin only on request, experts stored fused, GGUF paths, unsupported
architectures.
(That GGUF weights compute what HF computes is test_correctness' default-model test.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import greedy_params, random_prompts
from safetensors.torch import load_file, save_file

from labkit import LLM, EngineConfig
from labkit.engine.resolved_config import resolve

REPO = Path(__file__).resolve().parents[2]
SUPPORTED = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)


def _tokens(llm: LLM, prompts, max_tokens: int = 8):
    return [
        o.outputs[0].token_ids
        for o in llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)
    ]


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(f, dst / f.name)
    return dst


def test_dummy_weights_from_config_json_alone(tiny_ckpts, tmp_path):
    cfg_dir = tmp_path / "config-only"
    cfg_dir.mkdir()
    shutil.copy(tiny_ckpts["llama"] / "config.json", cfg_dir)
    vocab = json.loads((cfg_dir / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(vocab, [3, 30], seed=30)
    with LLM(str(cfg_dir), load_format="dummy", skip_tokenizer_init=True) as llm:
        outs = llm.generate(prompts, greedy_params(6), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
        assert all(o.outputs[0].text == "" for o in outs)  # no tokenizer, no text
        with pytest.raises(ValueError, match="prompt"):
            llm.generate("text needs a tokenizer", greedy_params(2), use_tqdm=False)
        first = [o.outputs[0].token_ids for o in outs]
    # Dummy weights are drawn from the engine seed: the same seed, the same model.
    with LLM(str(cfg_dir), load_format="dummy", skip_tokenizer_init=True) as again:
        assert _tokens(again, prompts, 6) == first
    # Without skip_tokenizer_init too: a directory with no tokenizer files runs without one
    # (what `labkit bench ... --load-format dummy` on data/configs needs).
    with LLM(str(cfg_dir), load_format="dummy") as llm:
        assert llm.get_tokenizer() is None
        assert _tokens(llm, prompts, 6) == first
        with pytest.raises(ValueError, match="token ids"):
            llm.generate("text needs a tokenizer", greedy_params(2), use_tqdm=False)
    # A tokenizer from elsewhere makes text prompts work.
    with LLM(str(cfg_dir), load_format="dummy", tokenizer=str(tiny_ckpts["llama"])) as llm:
        out = llm.generate("Hello, my name is", greedy_params(4), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "data" / "configs").iterdir()))
def test_shipped_benchmark_configs_resolve(name):
    cfg = resolve(
        EngineConfig.from_kwargs(
            model=str(REPO / "data" / "configs" / name),
            load_format="dummy",
            skip_tokenizer_init=True,
            device="cpu",
        )
    )
    assert cfg.model_config.architecture in SUPPORTED
    assert cfg.max_model_len == cfg.model_config.max_position_embeddings


def test_pickled_bin_checkpoint_needs_load_format_pt(tiny_ckpts, tiny_llms, tmp_path):
    src = tiny_ckpts["llama"]
    bin_dir = _copy_without_weights(src, tmp_path / "bin-only")
    torch.save(load_file(str(src / "model.safetensors")), bin_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="load_format"):
        LLM(str(bin_dir))
    prompts = random_prompts(tiny_llms("llama").config.model_config.vocab_size, [5, 40], seed=31)
    with LLM(str(bin_dir), load_format="pt") as llm:
        assert _tokens(llm, prompts) == _tokens(tiny_llms("llama"), prompts)


def test_sharded_safetensors_with_index(tiny_ckpts, tiny_llms, hf_models, tmp_path):
    sharded = tmp_path / "sharded"
    hf_models("qwen2").save_pretrained(str(sharded), max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    for f in tiny_ckpts["qwen2"].iterdir():  # tokenizer files
        if not (sharded / f.name).exists() and not f.name.endswith(".safetensors"):
            shutil.copy(f, sharded / f.name)
    prompts = random_prompts(tiny_llms("qwen2").config.model_config.vocab_size, [5, 40], seed=32)
    with LLM(str(sharded)) as llm:
        assert _tokens(llm, prompts) == _tokens(tiny_llms("qwen2"), prompts)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_fused_expert_checkpoint_loads_like_per_expert(kind, tiny_ckpts, tiny_llms, tmp_path):
    """transformers 5 models hold each layer's experts as two tensors (`mlp.experts.gate_up_proj`
    [E, 2I, H], `mlp.experts.down_proj` [E, H, I]); a checkpoint written that way (save_pretrained
    writes the per-expert names) loads into the same model."""
    src = tiny_ckpts[kind]
    fused_dir = _copy_without_weights(src, tmp_path / "fused")
    per_expert = load_file(str(src / "model.safetensors"))
    names = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}
    tensors, experts = {}, {}
    for name, t in per_expert.items():
        parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")
        if "experts" in parts:  # model.layers.L.mlp.experts.E.PROJ.weight
            i = parts.index("experts")
            experts.setdefault(".".join(parts[: i + 1]), {})[
                (int(parts[i + 1]), names[parts[i + 2]])
            ] = t
        else:
            tensors[name] = t
    for prefix, ws in experts.items():
        n = max(e for e, _ in ws) + 1
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([ws[e, 0], ws[e, 1]]) for e in range(n)]
        )
        tensors[f"{prefix}.down_proj"] = torch.stack([ws[e, 2] for e in range(n)])
    save_file(tensors, str(fused_dir / "model.safetensors"), metadata={"format": "pt"})
    prompts = random_prompts(tiny_llms(kind).config.model_config.vocab_size, [5, 40], seed=33)
    with LLM(str(fused_dir)) as llm:
        assert _tokens(llm, prompts) == _tokens(tiny_llms(kind), prompts)


def test_gguf_file_or_its_directory_resolve_like_the_default(default_gguf):
    default = resolve(EngineConfig.from_kwargs()).model_dir
    assert resolve(EngineConfig.from_kwargs(model=str(default_gguf))).model_dir == default
    assert resolve(EngineConfig.from_kwargs(model=str(default_gguf.parent))).model_dir == default
    assert (default / "config.json").exists()


GPT2_CONFIG = {  # as published with the gpt2 checkpoint: no Llama-style field names
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "layer_norm_epsilon": 1e-05,
    "vocab_size": 50257,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(GPT2_CONFIG, id="real_gpt2_config"),
        pytest.param(None, id="llama_shaped_config"),
    ],
)
def test_unsupported_architecture_lists_the_supported_ones(tiny_ckpts, tmp_path, config):
    if config is None:
        config = {
            **json.loads((tiny_ckpts["llama"] / "config.json").read_text()),
            "architectures": ["GPT2LMHeadModel"],
        }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True)
    assert all(arch in str(e.value) for arch in SUPPORTED)
