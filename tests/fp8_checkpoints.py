"""FP8 checkpoints written by the tests themselves: a tiny random Llama whose dimensions are
whole 128-blocks, quantized here (independently of labkit's own code) and written as the real
repos write them, each next to a float32 copy holding the dequantized weights.

  block: transformers' FP8 format (Qwen3-*-FP8): `quant_method: "fp8"`, 128x128
    `weight_block_size`, float32 `weight_scale_inv` [ceil(N / 128), ceil(K / 128)]
  channel: compressed-tensors (RedHatAI *-FP8-dynamic): `format: "float-quantized"`, weights
    per channel with bfloat16 `weight_scale` [N, 1], inputs dynamic per token
  tensor: compressed-tensors with one `weight_scale` per tensor

`<kind>-dequant`: the same model in float32, its weights q * scale, without quantization_config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = (128, 128)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Whole 128-blocks at TP=1 and TP=2: q 512 rows, k/v 256, gate/up 512, o/down inputs 512.
DIMS = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.08,  # clear winners among random logits (data/make_tiny_checkpoints.py)
)


def hf_fp8_config() -> dict:
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(BLOCK),
    }


def compressed_tensors_config(strategy: str) -> dict:
    return {
        "config_groups": {
            "group_0": {
                "input_activations": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": True,
                    "group_size": None,
                    "num_bits": 8,
                    "observer": None,
                    "observer_kwargs": {},
                    "strategy": "token",
                    "symmetric": True,
                    "type": "float",
                },
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "group_size": None,
                    "num_bits": 8,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": strategy,
                    "symmetric": True,
                    "type": "float",
                },
            }
        },
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale per 128x128 block, dequantized float32 weight)."""
    n, k = w.shape
    bn, bk = BLOCK
    padded = F.pad(w.float(), (0, -k % bk, 0, -n % bn))
    blocks = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    q = (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale, q.float() * full


def quantize_rows(
    w: torch.Tensor, per_tensor: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, bfloat16 scale [N, 1] or [1] as llm-compressor stores them, dequantized
    float32 weight)."""
    amax = w.float().abs().amax() if per_tensor else w.float().abs().amax(dim=1)
    scale = (amax / FP8_MAX).to(torch.bfloat16)
    s = scale.float().reshape(-1, 1)
    q = (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(1) if per_tensor else scale.reshape(-1, 1), q.float() * s


def round_inputs(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """x rounded through float8_e4m3fn with a dynamic scale per row (group None) or per row and
    group of `group` columns: what an FP8 GEMM sees of its input."""
    g = group or x.shape[-1]
    xs = x.float().reshape(*x.shape[:-1], x.shape[-1] // g, g)
    scale = xs.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    return ((xs / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale).reshape(x.shape)


def input_group(kind: str) -> int | None:
    return BLOCK[1] if kind == "block" else None


def round_projection_inputs(model: torch.nn.Module, kind: str) -> list:
    """Forward pre-hooks on an HF model's projections that round their inputs as `kind`'s FP8
    GEMMs do: with the dequantized weights, the float reference of the FP8 model. Returns the
    hooks' handles."""
    group = input_group(kind)
    return [
        module.register_forward_pre_hook(lambda _, args: (round_inputs(args[0], group),))
        for name, module in model.named_modules()
        if name.endswith(PROJECTIONS)
    ]


def build_base(out: Path, tokenizer_dir: Path) -> Path:
    """The float (bfloat16) model that every FP8 checkpoint here quantizes."""
    import transformers as tf

    torch.manual_seed(20)
    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = tf.LlamaConfig(
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        **DIMS,
    )
    path = out / "base"
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def write_fp8(base: Path, out: Path, kind: str) -> tuple[Path, Path]:
    """(the FP8 checkpoint of `kind`, its dequantized float32 twin), from `base`."""
    fp8_dir, float_dir = out / kind, out / f"{kind}-dequant"
    for d in (fp8_dir, float_dir):
        shutil.copytree(base, d, ignore=shutil.ignore_patterns("*.safetensors"))
    quantized, dequantized = {}, {}
    for name, w in load_file(str(base / "model.safetensors")).items():
        if not name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)):
            quantized[name], dequantized[name] = w, w.float()
            continue
        if kind == "block":
            q, scale, deq = quantize_blocks(w)
            quantized[name + "_scale_inv"] = scale
        else:
            q, scale, deq = quantize_rows(w, per_tensor=kind == "tensor")
            quantized[name + "_scale"] = scale
        quantized[name], dequantized[name] = q, deq
    save_file(quantized, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, str(float_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = (
        hf_fp8_config() if kind == "block" else compressed_tensors_config(kind)
    )
    (fp8_dir / "config.json").write_text(json.dumps(config, indent=2))
    return fp8_dir, float_dir


def build_all(out: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """{"block", "channel", "tensor", and each "<kind>-dequant": checkpoint directory}."""
    base = build_base(out, tokenizer_dir)
    paths = {}
    for kind in ("block", "channel", "tensor"):
        paths[kind], paths[f"{kind}-dequant"] = write_fp8(base, out, kind)
    return paths
