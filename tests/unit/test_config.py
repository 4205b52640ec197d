"""EngineConfig is the one definition of every engine option: checked when built, the CLI's flags
generated from it, kept as the user gave it; resolve() settles the rest."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle

import pytest

from labkit.config import EngineConfig, add_engine_args, engine_kwargs, engine_option_names
from labkit.engine.resolved_config import resolve


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"block_size": 0}, "block_size"),
        ({"dtype": "fp4"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"scheduling_policy": "lifo"}, "scheduling_policy"),
        ({"load_format": "onnx"}, "load_format"),
        ({"quantization": "int8"}, "quantization"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"distributed_executor_backend": "mpi"}, "distributed_executor_backend"),
    ],
)
def test_a_bad_option_names_its_field_before_any_work(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        EngineConfig(**kwargs)


def test_unknown_keywords_are_listed_with_the_known_ones():
    with pytest.raises(TypeError, match="unknown engine argument.*tensor_paralel_size.*known:"):
        EngineConfig.from_kwargs(tensor_paralel_size=2)


def test_every_option_has_a_flag_with_the_field_default():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    defaults = engine_kwargs(parser.parse_args([]))
    assert defaults == dataclasses.asdict(EngineConfig())
    assert set(defaults) == set(engine_option_names())


def test_flags_take_vllm_spellings():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(
        [
            "--tensor_parallel_size",
            "2",
            "--max-model-len",
            "64",
            "--no-enable-prefix-caching",
            "--enforce-eager",
            "--dtype",
            "bfloat16",
            "--async-scheduling",
        ]
    )
    kw = engine_kwargs(args)
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 64
    assert kw["enable_prefix_caching"] is False and kw["enforce_eager"] is True
    assert kw["async_scheduling"] is True and kw["dtype"] == "bfloat16"
    assert engine_kwargs(parser.parse_args(["-tp", "4"]))["tensor_parallel_size"] == 4
    backend = parser.parse_args(["--distributed-executor-backend", "ray"])
    assert engine_kwargs(backend)["distributed_executor_backend"] == "ray"
    assert kw["distributed_executor_backend"] == "mp"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "fp4"])  # choices come from the field


def _checkpoint(tmp_path, **overrides):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **overrides}))
    return str(tmp_path)


def test_resolve_keeps_the_users_options_and_fills_the_rest(tmp_path):
    options = EngineConfig(model=_checkpoint(tmp_path), device="cpu", load_format="dummy")
    resolved = resolve(options)
    assert resolved.options is options and options.max_model_len is None
    assert resolved.max_model_len == 128 and resolved.max_num_batched_tokens == 8192
    assert resolved.async_scheduling is False and str(resolved.dtype) == "torch.float32"
    assert resolved.block_size == 16  # read through to the options
    assert resolved.model_config.num_key_value_heads == 2
    again = pickle.loads(pickle.dumps(resolved))  # sent to tensor-parallel workers
    assert again.max_model_len == 128 and again.block_size == 16


def test_resolve_checks_what_depends_on_the_model(tmp_path):
    model = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*valid sizes: \[1, 2\]"):
        resolve(EngineConfig(model=model, device="cpu", tensor_parallel_size=3))
    with pytest.raises(ValueError, match="max_model_len=4096"):
        resolve(EngineConfig(model=model, device="cpu", max_model_len=4096))
    with pytest.raises(ValueError, match="model architecture 'GPT2LMHeadModel'"):
        resolve(
            EngineConfig(
                model=_checkpoint(tmp_path, architectures=["GPT2LMHeadModel"]), device="cpu"
            )
        )
