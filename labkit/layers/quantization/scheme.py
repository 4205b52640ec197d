"""Fp8Scheme: how an engine's linear layers hold FP8 weights and quantize their inputs, read from
the checkpoint's `quantization_config` and the `quantization` option.

Checkpoint formats (config.json's `quantization_config`):
  quant_method "fp8" (transformers' FP8 and vLLM's own): with `weight_block_size` [bn, bk] a
    scale per block (`weight_scale_inv` tensors, Qwen3's and DeepSeek's -FP8 repos), inputs
    quantized per token and group of bk columns; without it one `weight_scale` per tensor,
    inputs per tensor. Only `activation_scheme: "dynamic"`.
  quant_method "compressed-tensors" (llm-compressor, RedHatAI's -FP8-dynamic repos), format
    "float-quantized": 8-bit float weights with `weight_scale` per channel, per tensor or per
    block (`strategy`); inputs dynamic per token, per tensor or per group, or left unquantized
    (no `input_activations`: weight-only FP8).
Anything else is refused by name. `quantization="fp8"` on a float checkpoint quantizes its
weights at load, per output channel, with inputs quantized per token.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = (
    "labkit loads quant_method 'fp8' (dynamic activations, with or without weight_block_size) "
    "and 'compressed-tensors' FP8 ('float-quantized', 8-bit float weights, dynamic "
    "activations), and quantizes float checkpoints with quantization='fp8'"
)


@dataclass(frozen=True)
class Fp8Scheme:
    # "fp8" or "compressed-tensors": the checkpoint's FP8 weights load as they are stored;
    # None: float weights, quantized per output channel after loading.
    source: str | None
    weights: str  # "channel", "tensor" or "block": what one weight scale covers
    activations: str | None  # "token", "group", "tensor", or None (weight-only)
    block: tuple[int, int] | None = None  # (rows, columns) of a weight scale block
    activation_group: int | None = None  # columns per input scale, for "group"

    @property
    def serialized(self) -> bool:
        """Whether the checkpoint stores FP8 weights (else they are quantized at load)."""
        return self.source is not None

    def describe(self) -> str:
        """One line for the start-up log: where the FP8 weights come from, what one weight
        scale covers and how the inputs are quantized."""
        origin = f"as stored ({self.source})" if self.serialized else "quantized at load"
        if self.weights == "block":
            cover = f"a scale per {self.block[0]}x{self.block[1]} block"
        else:
            cover = f"a scale per {'output channel' if self.weights == 'channel' else 'tensor'}"
        inputs = {
            None: "weight-only",
            "token": "inputs quantized per token",
            "tensor": "inputs quantized per tensor",
            "group": f"inputs quantized per token and {self.activation_group} columns",
        }[self.activations]
        return f"FP8 weights {origin}, {cover}, {inputs}"


def fp8_scheme(quantization_config: dict | None, requested: str | None) -> Fp8Scheme | None:
    """The scheme of a checkpoint whose config.json has `quantization_config` (None: none),
    given the user's `quantization` option (None: whatever the checkpoint says)."""
    if quantization_config is None:
        return None if requested is None else Fp8Scheme(None, "channel", "token")
    method = quantization_config.get("quant_method")
    if method == "fp8":
        return _hf_fp8(quantization_config)
    if method == "compressed-tensors":
        return _compressed_tensors(quantization_config)
    given = "" if requested is None else f" (quantization={requested!r} was asked for)"
    raise ValueError(
        f"quantization: the checkpoint is quantized with quant_method={method!r}{given}, "
        f"which labkit does not load; {SUPPORTED}"
    )


def _refuse(what: str) -> ValueError:
    return ValueError(f"quantization: {what} is not supported; {SUPPORTED}")


def _hf_fp8(qc: dict) -> Fp8Scheme:
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise _refuse(f"quant_method 'fp8' with activation_scheme={qc['activation_scheme']!r}")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _refuse(f"quant_method 'fp8' with fmt={qc['fmt']!r} (only 'e4m3')")
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Scheme("fp8", "tensor", "tensor")
    bn, bk = _block(block, "weight_block_size")
    return Fp8Scheme("fp8", "block", "group", (bn, bk), bk)


def _block(value, name: str) -> tuple[int, int]:
    if not (isinstance(value, list | tuple) and len(value) == 2 and min(value) >= 1):
        raise _refuse(f"{name}={value!r} (must be [rows, columns])")
    return int(value[0]), int(value[1])


def _compressed_tensors(qc: dict) -> Fp8Scheme:
    if qc.get("kv_cache_scheme"):
        raise _refuse("a compressed-tensors kv_cache_scheme (a quantized KV cache)")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _refuse("compressed-tensors without config_groups")
    schemes = {_ct_group(name, g, qc.get("format")) for name, g in groups.items()}
    if len(schemes) > 1:
        raise _refuse(f"compressed-tensors config_groups of different schemes ({sorted(groups)})")
    return schemes.pop()


def _ct_group(name: str, group: dict, default_format: str | None) -> Fp8Scheme:
    fmt = group.get("format") or default_format
    if fmt != "float-quantized":
        raise _refuse(f"compressed-tensors format {fmt!r} (config group {name!r})")
    w = group.get("weights") or {}
    if (w.get("type"), w.get("num_bits")) != ("float", 8) or not w.get("symmetric", True):
        raise _refuse(
            f"compressed-tensors weights of type {w.get('type')!r} with {w.get('num_bits')} bits "
            f"(config group {name!r}; only symmetric 8-bit float)"
        )
    strategy = w.get("strategy")
    if strategy not in ("channel", "tensor", "block"):
        raise _refuse(f"compressed-tensors weight strategy {strategy!r} (config group {name!r})")
    block = _block(w.get("block_structure"), "block_structure") if strategy == "block" else None
    a = group.get("input_activations")
    if a is None:
        return Fp8Scheme("compressed-tensors", strategy, None, block)
    if (a.get("type"), a.get("num_bits")) != ("float", 8) or a.get("dynamic") is not True:
        raise _refuse(
            f"compressed-tensors input activations {a.get('type')!r}/{a.get('num_bits')} bits, "
            f"dynamic={a.get('dynamic')!r} (config group {name!r}; only dynamic 8-bit float)"
        )
    act = a.get("strategy")
    if act not in ("token", "tensor", "group"):
        raise _refuse(f"compressed-tensors activation strategy {act!r} (config group {name!r})")
    group_size = a.get("group_size") if act == "group" else None
    if act == "group" and not (isinstance(group_size, int) and group_size >= 1):
        raise _refuse(f"activation group_size={group_size!r} (config group {name!r})")
    return Fp8Scheme("compressed-tensors", strategy, act, block, group_size)
