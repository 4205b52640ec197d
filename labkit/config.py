"""EngineConfig: every engine option in one dataclass, with vLLM's names, defaults and help text.

This is the one place an engine option is defined: `LLM(**kwargs)`, the `labkit` command's flags
(generated from these fields by `add_engine_args`), `labkit.sweep()` and the benchmarks all read
it. It holds the options as the user gave them, checked field by field when built (no file or
device is looked at here); `labkit.engine.resolved_config.resolve` settles "auto" and None
against the machine and the checkpoint.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, dataclass, field, fields

from labkit.utils import check_field

DTYPES = ("float32", "float", "bfloat16", "float16", "half")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "pt")
EXECUTOR_BACKENDS = ("mp", "ray")
QUANTIZATIONS = ("fp8",)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def option(default, help: str, *, flags: tuple[str, ...] = (), choices: tuple | None = None):
    """A field of EngineConfig: its default, its --help text, extra flag spellings and choices."""
    return field(default=default, metadata={"help": help, "flags": flags, "choices": choices})


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = option(
        None,
        "a Hugging Face repo id (Qwen/Qwen2.5-1.5B-Instruct), or a local checkpoint "
        "directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    tokenizer: str | None = option(None, "a repo id or tokenizer directory (default: the model's)")
    revision: str | None = option(
        None, "the model's Hub revision: a branch, tag or commit (default: main)"
    )
    tokenizer_revision: str | None = option(None, "the tokenizer's Hub revision (default: main)")
    download_dir: str | None = option(
        None,
        "the Hugging Face cache to read and download "
        "into (default: $HF_HUB_CACHE, ~/.cache/huggingface/hub)",
    )
    tensor_parallel_size: int = option(
        1,
        "number of tensor-parallel ranks (one process each)",
        flags=("--tensor_parallel_size", "-tp"),
    )
    distributed_executor_backend: str = option(
        "mp",
        "where tensor-parallel ranks 1..N-1 run: 'mp', child processes on this machine; "
        "'ray', Ray actors on the GPUs (or CPUs) a Ray cluster assigns, across nodes too "
        "(pip install labkit[ray]); rank 0 runs in the engine's process either way",
        choices=EXECUTOR_BACKENDS,
    )
    dtype: str = option(
        "auto",
        "weights and activations; 'auto': float32 on the CPU, the "
        "checkpoint's dtype on CUDA (float32 checkpoints run in bfloat16)",
        choices=("auto",) + DTYPES,
    )
    seed: int = option(0, "random seed of the engine (dummy weights, unseeded sampling)")
    device: str = option(
        "auto", "'auto': CUDA when there is a GPU, else the CPU", choices=("auto", "cpu", "cuda")
    )
    load_format: str = option(
        "auto",
        "checkpoint format; 'dummy': random weights from config.json; 'pt': allow pickled *.bin",
        choices=LOAD_FORMATS,
    )
    quantization: str | None = option(
        None,
        "'fp8': float8 weights, per output channel, quantized at load (an FP8 checkpoint loads "
        "as it is stored either way; default: what the checkpoint's quantization_config says)",
        choices=QUANTIZATIONS,
    )
    kv_cache_dtype: str = option(
        "auto",
        "KV-cache data type: 'auto' (the model's dtype), or 'fp8' / 'fp8_e4m3' (float8_e4m3fn "
        "with a scale of 1.0: twice the tokens of a 16-bit cache in the same memory)",
        choices=KV_CACHE_DTYPES,
    )
    max_model_len: int | None = option(
        None,
        "longest sequence (prompt + output) in tokens (default: the model's "
        "max_position_embeddings)",
    )
    block_size: int = option(16, "tokens per KV-cache block")
    num_kv_blocks: int | None = option(
        None,
        "KV-cache blocks to allocate, overriding the memory-based size (vLLM's "
        "num_gpu_blocks_override)",
    )
    gpu_memory_utilization: float = option(
        0.9, "fraction of the GPU's memory for weights, activations and the KV cache"
    )
    kv_cache_memory_bytes: int | None = option(
        None,
        "KV-cache size in bytes (CPU default: 2 GiB, capped at what max_num_seqs "
        "sequences of max_model_len tokens can use)",
    )
    max_num_seqs: int = option(
        256, "most sequences in one engine step (and most choices, n, one request may ask for)"
    )
    max_num_batched_tokens: int | None = option(
        None, "most tokens in one engine step (default: 16384 on CUDA, 8192 on the CPU)"
    )
    enable_chunked_prefill: bool = option(
        True, "prefill prompts longer than the step's token budget in chunks"
    )
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of shared prompt prefixes")
    scheduling_policy: str = option(
        "fcfs",
        "'fcfs', or 'priority': lower value first, ties by arrival",
        choices=("fcfs", "priority"),
    )
    enforce_eager: bool = option(False, "never capture CUDA graphs")
    disable_custom_all_reduce: bool = option(
        False, "NCCL for every tensor-parallel all-reduce (no NVLink peer all-reduce)"
    )
    # vLLM >= 0.14's default on GPUs; as there, off on the CPU, where the host is the device.
    async_scheduling: bool | None = option(
        None,
        "schedule step n+1 while step n runs on the device (default: on for CUDA, off on the CPU)",
    )
    max_logprobs: int = option(
        20,
        "most logprobs a request may ask for (logprobs, top_logprobs, prompt_logprobs); "
        "-1: up to the vocabulary size",
    )
    skip_tokenizer_init: bool = option(False, "run without a tokenizer (token-id prompts only)")
    trust_remote_code: bool = option(
        False, "accepted for vLLM compatibility; labkit runs no code from checkpoints"
    )

    def __post_init__(self) -> None:
        check_field(
            self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            self.tensor_parallel_size,
            ">= 1",
        )
        check_field(
            self.distributed_executor_backend in EXECUTOR_BACKENDS,
            "distributed_executor_backend",
            self.distributed_executor_backend,
            "'mp' or 'ray'",
        )
        check_field(self.block_size >= 1, "block_size", self.block_size, ">= 1")
        check_field(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        check_field(
            self.max_logprobs >= -1,
            "max_logprobs",
            self.max_logprobs,
            ">= 0, or -1 for no limit below the vocabulary size",
        )
        check_field(
            self.load_format in LOAD_FORMATS,
            "load_format",
            self.load_format,
            f"one of {', '.join(LOAD_FORMATS)}",
        )
        check_field(
            self.quantization is None or self.quantization in QUANTIZATIONS,
            "quantization",
            self.quantization,
            f"None or one of {', '.join(map(repr, QUANTIZATIONS))}",
        )
        check_field(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            self.kv_cache_dtype,
            f"one of {', '.join(map(repr, KV_CACHE_DTYPES))}",
        )
        check_field(
            self.dtype == "auto" or self.dtype in DTYPES,
            "dtype",
            self.dtype,
            f"'auto' or one of {', '.join(DTYPES)}",
        )
        check_field(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            "in (0, 1]",
        )
        check_field(
            self.num_kv_blocks is None or self.num_kv_blocks >= 1,
            "num_kv_blocks",
            self.num_kv_blocks,
            ">= 1",
        )
        check_field(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes >= 1,
            "kv_cache_memory_bytes",
            self.kv_cache_memory_bytes,
            ">= 1",
        )
        check_field(
            self.max_model_len is None or self.max_model_len >= 1,
            "max_model_len",
            self.max_model_len,
            ">= 1",
        )
        check_field(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            self.max_num_batched_tokens,
            ">= 1",
        )
        check_field(
            self.scheduling_policy in ("fcfs", "priority"),
            "scheduling_policy",
            self.scheduling_policy,
            "'fcfs' or 'priority'",
        )
        check_field(
            self.device in ("auto", "cpu", "cuda"), "device", self.device, "'auto', 'cpu' or 'cuda'"
        )

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """As the constructor, with an unknown keyword named together with the known ones."""
        known = set(engine_option_names())
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown engine argument(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)


def engine_option_names() -> list[str]:
    return [f.name for f in fields(EngineConfig)]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, spelt as vLLM spells it (`--max-model-len`), with the
    field's default and help text; booleans that default to on (or to 'auto') take --no-X too."""
    hints = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        meta = f.metadata
        names = ["--" + f.name.replace("_", "-"), *meta["flags"]]
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        default = None if f.default is MISSING else f.default
        kwargs = {"dest": f.name, "default": default, "help": meta["help"]}
        if base is bool:
            if default is False:
                kwargs["action"] = "store_true"
            else:
                kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
        parser.add_argument(*names, **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig fields of parsed command-line arguments."""
    return {name: getattr(args, name) for name in engine_option_names()}
