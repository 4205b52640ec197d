"""Ceilings and floors: the fastest this machine could run a batch.

Ceilings are measured, not looked up: a large copy (bytes read + written per second) and a
square matmul (FLOP/s) in the engine's dtype, timed once per device, dtype and thread count and
cached in <cache>/ceilings.json ($LABKIT_CACHE, default ~/.cache/labkit).

Floors count the work a batch cannot avoid: every step reads every weight once and the K and V of
every context token, and does 2 FLOPs per weight per token plus attention (QK^T and PV, 4 FLOPs
per head dimension per query-key pair). A phase's floor is, step by step, the larger of
bytes / bandwidth and FLOPs / FLOP rate; `floor / measured` is the fraction of the floor reached.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from labkit.lab.env import device_name
from labkit.utils import cache_root


@dataclass(frozen=True)
class Ceilings:
    device_name: str
    dtype: str
    bytes_per_s: float  # copy: bytes read + bytes written per second
    flops_per_s: float  # square matmul
    threads: int

    def scaled(self, n: int) -> Ceilings:
        """n such devices working in parallel (tensor parallel ranks on n GPUs)."""
        return replace(self, bytes_per_s=self.bytes_per_s * n, flops_per_s=self.flops_per_s * n)


def ceilings(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    refresh: bool = False,
    cache_file: Path | None = None,
) -> Ceilings:
    """This machine's ceilings, measured on first use (about a second on a CPU) and cached.
    `refresh=True` measures again and keeps the better of each figure: a ceiling is the best the
    machine has shown, and a measurement taken while other work ran comes out low."""
    path = cache_file or cache_root() / "ceilings.json"
    key = (
        f"{device_name(device)}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    )
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if refresh or key not in cache:
        new, old = measure(device, dtype), cache.get(key)
        if old:
            new = replace(
                new,
                bytes_per_s=max(new.bytes_per_s, old["bytes_per_s"]),
                flops_per_s=max(new.flops_per_s, old["flops_per_s"]),
            )
        cache[key] = asdict(new)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: parallel runs may share the cache
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    return Ceilings(**cache[key])


def measure(device: str, dtype: torch.dtype) -> Ceilings:
    return Ceilings(
        device_name(device),
        str(dtype).removeprefix("torch."),
        _copy_rate(device, dtype),
        _matmul_rate(device, dtype),
        torch.get_num_threads(),
    )


def _copy_rate(device: str, dtype: torch.dtype) -> float:
    """Bytes read + written per second by a copy far larger than the caches."""
    size = (2 << 30) if device.startswith("cuda") else (128 << 20)
    a = torch.ones(size // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    b = torch.empty_like(a)
    return 2 * size / _best(lambda: b.copy_(a), device)


def _matmul_rate(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device.startswith("cuda") else 1024
    x, y = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / _best(lambda: x @ y, device)


def _best(fn: Callable[[], object], device: str, repeats: int = 20) -> float:
    """The fastest of `repeats` timed calls after one warm-up: the least disturbed by other work
    (on a shared machine most calls are slowed by it)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    elem_bytes: int
    # Mixture-of-experts layers (0 for a dense model): each has `experts` experts of width
    # `expert_intermediate`, of which a token uses `experts_per_tok`, in place of the dense MLP.
    moe_layers: int = 0
    experts: int = 0
    experts_per_tok: int = 0
    expert_intermediate: int = 0
    # Bytes per element of the decoder layers' matmul weights where they are stored otherwise
    # than the model's dtype (FP8: 1 plus the share of its float32 scale); None: elem_bytes.
    # The LM head stays at elem_bytes.
    layer_weight_bytes: float | None = None
    # Bytes per KV-cache element where the cache is stored otherwise than the model's dtype
    # (kv_cache_dtype="fp8": 1); None: elem_bytes.
    kv_elem_bytes: int | None = None

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a ResolvedConfig (its model_config, dtype and KV-cache dtype)."""
        hc = config.model_config
        return cls(
            hc.num_hidden_layers,
            hc.hidden_size,
            hc.num_attention_heads,
            hc.num_key_value_heads,
            hc.head_dim,
            hc.intermediate_size,
            hc.vocab_size,
            torch.empty((), dtype=config.dtype).element_size(),
            moe_layers=sum(hc.is_moe_layer(i) for i in range(hc.num_hidden_layers)),
            experts=hc.num_experts,
            experts_per_tok=hc.num_experts_per_tok,
            expert_intermediate=hc.moe_intermediate_size,
            kv_elem_bytes=config.kv_dtype.itemsize,
        )

    @property
    def _attention_params(self) -> int:
        """q, k, v, o of every layer."""
        per_layer = (
            2 * self.hidden * self.heads * self.head_dim
            + 2 * self.hidden * self.kv_heads * self.head_dim
        )
        return self.layers * per_layer

    @property
    def _dense_mlp_params(self) -> int:
        return (self.layers - self.moe_layers) * 3 * self.hidden * self.intermediate

    @property
    def _expert_params(self) -> int:
        """One expert's gate, up and down."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def body_params(self) -> int:
        """Matmul weights of the decoder layers that one token multiplies: q, k, v, o, and
        gate, up, down of the dense MLPs or of the experts it is routed to (and the router)."""
        moe = self.moe_layers * (
            self.experts_per_tok * self._expert_params + self.hidden * self.experts
        )
        return self._attention_params + self._dense_mlp_params + moe

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        """Bytes of every matmul weight (the embedding lookup reads a few rows)."""
        return self.weight_bytes_for(None)

    def weight_bytes_for(self, tokens: int | None) -> int:
        """Bytes of the weights a pass over `tokens` tokens reads at least: every dense weight,
        and of each MoE layer the experts its tokens are routed to, counted as the expected
        number of distinct experts under uniform routing (None: every expert)."""
        experts = self.experts
        if tokens is not None and self.experts:
            unused = (1 - self.experts_per_tok / self.experts) ** tokens
            experts = self.experts * (1 - unused)
        moe = self.moe_layers * (experts * self._expert_params + self.hidden * self.experts)
        layers = self._attention_params + self._dense_mlp_params + moe
        per_weight = self.layer_weight_bytes or self.elem_bytes
        return int(layers * per_weight + self.head_params * self.elem_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        return (
            2
            * self.layers
            * self.kv_heads
            * self.head_dim
            * (self.kv_elem_bytes or self.elem_bytes)
        )

    def attention_flops(self, context: int) -> int:
        """One query token against `context` keys: QK^T and PV over every layer and head."""
        return 4 * self.layers * self.heads * self.head_dim * context


@dataclass
class Work:
    """What a phase must do: FLOPs, bytes moved, and the time that takes at the ceilings."""

    flops: float = 0.0
    bytes: float = 0.0
    floor_s: float = 0.0

    def add(self, flops: float, bytes_: float, ceil: Ceilings) -> None:
        self.flops += flops
        self.bytes += bytes_
        self.floor_s += max(flops / ceil.flops_per_s, bytes_ / ceil.bytes_per_s)


def batch_work(
    shape: ModelShape, batch: int, input_len: int, output_len: int, ceil: Ceilings
) -> tuple[Work, Work]:
    """(prefill, decode) for `batch` prompts of `input_len` tokens generating `output_len` each:
    the prefill computes every prompt token (the LM head only for the last) and makes the first
    token; each of the output_len - 1 decode steps makes one token per sequence."""
    prefill, decode = Work(), Work()
    # Causal attention: prompt position i sees i keys, so sum(1..input_len) pairs per sequence.
    prefill.add(
        2 * shape.body_params * batch * input_len
        + 2 * shape.head_params * batch
        + batch * shape.attention_flops(input_len * (input_len + 1) // 2),
        shape.weight_bytes_for(batch * input_len) + batch * input_len * shape.kv_bytes_per_token,
        ceil,
    )
    for k in range(1, output_len):
        context = input_len + k
        decode.add(
            batch * (2 * (shape.body_params + shape.head_params) + shape.attention_flops(context)),
            shape.weight_bytes_for(batch) + batch * context * shape.kv_bytes_per_token,
            ceil,
        )
    return prefill, decode
