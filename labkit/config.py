"""EngineConfig: every engine option in one dataclass, with vLLM's names and defaults,
validated once before any work starts."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from labkit.models.loader import LOAD_FORMATS, resolve_model_dir
from labkit.models.model_config import ModelConfig
from labkit.models.registry import model_class

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None            # None: the embedded default model (SmolLM2-135M-Instruct)
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    seed: int = 0
    device: str = "auto"                # "auto": CUDA when there is a GPU, else CPU
    load_format: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None    # vLLM's num_gpu_blocks_override
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"     # or "priority": lower value first, ties by arrival
    enforce_eager: bool = False
    disable_custom_all_reduce: bool = False  # True: NCCL for every TP all-reduce (CUDA)
    # Schedule step n+1 while step n runs on the device (vLLM >= 0.14's default on GPUs; as
    # there, off on the CPU, where the host is the device). None: on for CUDA, off for CPU.
    async_scheduling: bool | None = None
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False     # accepted for vLLM compatibility; nothing remote runs

    # Filled in by resolve(), not by users.
    model_dir: Path | None = None
    hf_config: ModelConfig | None = None
    torch_dtype: torch.dtype | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls) if f.name not in ("model_dir", "hf_config", "torch_dtype")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        cfg = cls(**kwargs)
        cfg.resolve()
        return cfg

    def resolve(self) -> None:
        if self.model is None:
            from labkit.default_model import default_model_path
            self.model = str(default_model_path())
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        _check(self.block_size >= 1, "block_size", self.block_size, ">= 1")
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.load_format in LOAD_FORMATS, "load_format", self.load_format,
               f"one of {', '.join(LOAD_FORMATS)}")
        _check(self.dtype == "auto" or self.dtype in DTYPES, "dtype", self.dtype,
               f"'auto' or one of {', '.join(DTYPES)}")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
               self.gpu_memory_utilization, "in (0, 1]")
        _check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks",
               self.num_kv_blocks, ">= 1")
        _check(self.scheduling_policy in ("fcfs", "priority"), "scheduling_policy",
               self.scheduling_policy, "'fcfs' or 'priority'")
        _check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "'auto', 'cpu' or 'cuda'")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.async_scheduling is None:
            self.async_scheduling = self.device == "cuda"
        self.model_dir = resolve_model_dir(self.model)
        raw = json.loads((self.model_dir / "config.json").read_text())
        # Unsupported architectures fail here, before their config's fields are read.
        model_class((raw.get("architectures") or ["(none given)"])[0])
        self.hf_config = ModelConfig.from_dict(raw)
        hc, tp = self.hf_config, self.tensor_parallel_size
        for name, n in (("num_attention_heads", hc.num_attention_heads),
                        ("num_key_value_heads", hc.num_key_value_heads)):
            _check(n % tp == 0, "tensor_parallel_size", tp,
                   f"a divisor of the model's {name} ({n}); valid sizes: "
                   f"{[d for d in range(1, hc.num_key_value_heads + 1) if hc.num_attention_heads % d == 0 and hc.num_key_value_heads % d == 0]}")
        if self.max_model_len is None:
            self.max_model_len = hc.max_position_embeddings
        _check(1 <= self.max_model_len <= hc.max_position_embeddings, "max_model_len",
               self.max_model_len, f"in [1, {hc.max_position_embeddings}] (the model's max_position_embeddings)")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 16384 if self.device == "cuda" else 8192
        if not self.enable_chunked_prefill:
            self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_model_len)
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")
        self.torch_dtype = self._pick_dtype()

    def _pick_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device == "cpu":
            return torch.float32  # CPU matmuls are fastest and exact in float32
        ckpt = DTYPES.get(self.hf_config.torch_dtype, torch.float32)
        # As vLLM: float32 checkpoints run in half precision on GPUs (bf16 where supported).
        return torch.bfloat16 if ckpt == torch.float32 else ckpt


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: must be {allowed}")
