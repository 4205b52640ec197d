"""ResolvedConfig: the engine's options with every "auto" and None settled.

`resolve(options)` looks at this machine (is there a GPU?) and at the checkpoint (finding it:
a path, or a Hub repo id looked up in the local Hub cache and downloaded if missing; converting
a GGUF file once), reads its config.json into labkit's own `ModelConfig`, checks the
options that depend on the model (tensor-parallel size against the heads and the FP8 scale
blocks, max_model_len against the positions, `quantization` against the checkpoint's) and fills
in the defaults that depend on the device. The user's EngineConfig is kept unchanged as
`options`; the engine, the model runner of every rank, the benchmarks and the lab read this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from labkit.config import EngineConfig
from labkit.default_model import default_model_path
from labkit.layers.quantization.scheme import Fp8Scheme, fp8_scheme
from labkit.models import hub
from labkit.models.fp8_sharding import check_fp8_sharding
from labkit.models.loader import resolve_model_dir
from labkit.models.model_config import ModelConfig
from labkit.models.registry import model_class
from labkit.utils import check_field

TORCH_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ResolvedConfig:
    options: EngineConfig  # as the user gave them
    model_dir: Path  # an HF-style checkpoint directory
    tokenizer_dir: Path  # where the tokenizer's files are (model_dir unless `tokenizer`)
    model_config: ModelConfig  # its config.json
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    kv_dtype: torch.dtype  # the KV cache's elements
    max_model_len: int
    max_num_batched_tokens: int
    async_scheduling: bool
    # FP8 linear layers (the `quantization` option and the checkpoint's quantization_config
    # settled into one scheme), None for float ones.
    quant_scheme: Fp8Scheme | None

    def __getattr__(self, name: str):
        # Options that need no settling (block_size, max_num_seqs, ...) read through to the
        # user's config, so that each is named once. Dunder lookups (pickle, copy) must fail
        # here: `options` is not set yet while an instance is being unpickled.
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        return getattr(self.options, name)


def resolve(options: EngineConfig) -> ResolvedConfig:
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = resolve_model_dir(
        _local(options.model or str(default_model_path()), "model", options.revision, options)
    )
    tokenizer_dir = (
        model_dir
        if options.tokenizer is None
        else Path(_local(options.tokenizer, "tokenizer", options.tokenizer_revision, options))
    )
    raw = json.loads((model_dir / "config.json").read_text())
    # Unsupported architectures fail here, before their config's fields are read.
    model_class((raw.get("architectures") or ["(none given)"])[0])
    mc = ModelConfig.from_dict(raw)
    tp = options.tensor_parallel_size
    valid = [
        d
        for d in range(1, mc.num_key_value_heads + 1)
        if mc.num_attention_heads % d == 0 and mc.num_key_value_heads % d == 0
    ]
    for name, n in (
        ("num_attention_heads", mc.num_attention_heads),
        ("num_key_value_heads", mc.num_key_value_heads),
    ):
        check_field(
            n % tp == 0,
            "tensor_parallel_size",
            tp,
            f"a divisor of the model's {name} ({n}); valid sizes: {valid}",
        )
    if mc.num_experts:  # every rank holds a slice of each expert's intermediate dimension
        check_field(
            mc.moe_intermediate_size % tp == 0,
            "tensor_parallel_size",
            tp,
            f"a divisor of the experts' intermediate size ({mc.moe_intermediate_size})",
        )
    quant = fp8_scheme(raw.get("quantization_config"), options.quantization)
    if quant is not None:
        check_fp8_sharding(mc, quant, tp)
    max_model_len = options.max_model_len or mc.max_position_embeddings
    check_field(
        max_model_len <= mc.max_position_embeddings,
        "max_model_len",
        max_model_len,
        f"in [1, {mc.max_position_embeddings}] (the model's max_position_embeddings)",
    )
    batched = options.max_num_batched_tokens or (16384 if device == "cuda" else 8192)
    if not options.enable_chunked_prefill:
        batched = max(batched, max_model_len)
    async_scheduling = (
        device == "cuda" if options.async_scheduling is None else options.async_scheduling
    )
    dtype = _dtype(options.dtype, device, mc)
    return ResolvedConfig(
        options,
        model_dir,
        tokenizer_dir,
        mc,
        device,
        dtype,
        _kv_dtype(options.kv_cache_dtype, dtype, device),
        max_model_len,
        batched,
        async_scheduling,
        quant,
    )


def _local(name: str, what: str, revision: str | None, options: EngineConfig) -> str:
    """`name` itself if it is a path here, else its Hub snapshot's directory."""
    if not hub.is_hub_name(name):
        return name
    files = hub.patterns(options.load_format, tokenizer_only=what == "tokenizer")
    return str(
        hub.snapshot(
            name,
            revision=revision,
            download_dir=options.download_dir,
            allow_patterns=files,
            what=what,
        )
    )


def _dtype(name: str, device: str, mc: ModelConfig) -> torch.dtype:
    if name != "auto":
        return TORCH_DTYPES[name]
    if device == "cpu":
        return torch.float32  # CPU matmuls are fastest and exact in float32
    ckpt = TORCH_DTYPES.get(mc.torch_dtype, torch.float32)
    # As vLLM: float32 checkpoints run in half precision on GPUs (bf16 where supported).
    return torch.bfloat16 if ckpt == torch.float32 else ckpt


def _kv_dtype(name: str, dtype: torch.dtype, device: str) -> torch.dtype:
    if name == "auto":
        return dtype
    # The kernels round to and from float8 with instructions that Ada and Hopper have.
    check_field(
        device != "cuda" or torch.cuda.get_device_capability() >= (8, 9),
        "kv_cache_dtype",
        name,
        "'auto' on this GPU (an FP8 KV cache needs compute capability 8.9 or newer)",
    )
    return torch.float8_e4m3fn
