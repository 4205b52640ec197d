"""Bad input fails early with a ValueError that names the offending field, and leaves nothing
behind: the same LLM serves the next valid batch as if nothing had happened."""

from __future__ import annotations

import json
import re

import psutil
import pytest
from helpers import assert_engine_idle, greedy_params, random_prompts

from labkit import LLM, SamplingParams


def _names(field: str) -> str:
    return rf"\b{re.escape(field)}\b"


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("temperature", -0.5),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("n", 0),
        ("min_p", 1.5),
        ("min_tokens", -1),
        ("logprobs", -1),
    ],
)
def test_bad_sampling_params_raise_at_construction(field, value):
    with pytest.raises(ValueError, match=_names(field)):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match=_names("min_tokens")):
        SamplingParams(min_tokens=9, max_tokens=8)


@pytest.fixture(scope="module")
def short_llm(tiny_ckpts):
    """A tiny model with a short context, so that "too long" is cheap to build."""
    with LLM(str(tiny_ckpts["llama"]), max_model_len=64) as llm:
        yield llm


def _valid_batch(llm: LLM):
    prompts = random_prompts(llm.config.model_config.vocab_size, [3, 17, 40], seed=20)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy_params(6), use_tqdm=False)]


@pytest.mark.parametrize(
    "prompt,field",
    [
        pytest.param("", "prompt", id="empty_text"),
        pytest.param({"prompt_token_ids": []}, "prompt", id="empty_ids"),
        # exactly max_model_len leaves no room for an output token
        pytest.param(list(range(100, 164)), "prompt", id="max_model_len_ids"),
        pytest.param(list(range(100, 300)), "prompt", id="too_long_ids"),
        pytest.param("word " * 100, "prompt", id="too_long_text"),
        pytest.param([5, -1, 7], "prompt_token_ids", id="negative_id"),
        pytest.param([5, 10**7], "prompt_token_ids", id="id_past_vocab"),
        pytest.param({"text": "no such key"}, "prompt", id="dict_without_prompt"),
    ],
)
def test_bad_prompt_fails_generate_and_leaves_engine_clean(short_llm, prompt, field):
    ref = _valid_batch(short_llm)
    n_steps = short_llm.engine.stats().num_steps
    # The bad prompt comes last: the good ones before it must not have been queued either.
    good = random_prompts(short_llm.config.model_config.vocab_size, [4, 9], seed=21)
    with pytest.raises(ValueError, match=_names(field)):
        short_llm.generate(good + [prompt], greedy_params(4), use_tqdm=False)
    assert_engine_idle(short_llm)
    assert short_llm.engine.stats().num_steps == n_steps  # nothing ran
    assert _valid_batch(short_llm) == ref


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_beyond_vocab_fail_at_generate(short_llm, field):
    ref = _valid_batch(short_llm)
    vocab = short_llm.config.model_config.vocab_size
    with pytest.raises(ValueError, match=_names(field)):
        short_llm.generate(
            "Hello, my name is", SamplingParams(max_tokens=2, **{field: vocab + 1}), use_tqdm=False
        )
    assert_engine_idle(short_llm)
    assert _valid_batch(short_llm) == ref


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_above_max_logprobs_are_refused(short_llm, field):
    # vLLM's --max-logprobs (20): a request for more is refused before any work.
    with pytest.raises(ValueError, match=rf"{field}=21 .*max_logprobs is 20"):
        short_llm.generate("Hello", SamplingParams(max_tokens=2, **{field: 21}), use_tqdm=False)
    out = short_llm.generate(
        "Hello, my name is", SamplingParams(max_tokens=2, **{field: 20}), use_tqdm=False
    )
    assert (
        len(out[0].outputs[0].logprobs[0]) >= 20
        if field == "logprobs"
        else len(out[0].prompt_logprobs[1]) >= 20
    )
    assert_engine_idle(short_llm)


def test_max_logprobs_is_the_engines_option(tiny_ckpts):
    with LLM(str(tiny_ckpts["llama"]), max_logprobs=-1, max_num_seqs=4) as llm:
        vocab = llm.config.model_config.vocab_size
        out = llm.generate("Hello", SamplingParams(max_tokens=1, logprobs=vocab), use_tqdm=False)
        assert len(out[0].outputs[0].logprobs[0]) == vocab
        # The n choices of one request are bounded by the batch: at most max_num_seqs.
        with pytest.raises(ValueError, match=r"\bn=5 is invalid: at most max_num_seqs \(4\)"):
            llm.generate("Hello", SamplingParams(max_tokens=1, n=5), use_tqdm=False)
        assert (
            len(llm.generate("Hi", SamplingParams(max_tokens=1, n=4), use_tqdm=False)[0].outputs)
            == 4
        )
    with pytest.raises(ValueError, match=_names("max_logprobs")):
        LLM(str(tiny_ckpts["llama"]), max_logprobs=-2)


def test_logprobs_beyond_vocab_fail_at_add_request(short_llm):
    # The engine API (what a server drives) must refuse the request up front: accepted, it
    # would make every later step() fail while it sits in the batch.
    eng = short_llm.engine
    vocab = short_llm.config.model_config.vocab_size
    try:
        with pytest.raises(ValueError, match=_names("logprobs")):
            eng.add_request(
                "too-many-logprobs", "Hello", SamplingParams(max_tokens=2, logprobs=vocab + 1)
            )
    finally:
        eng.abort_request("too-many-logprobs")  # keep the shared engine usable for later tests
    assert_engine_idle(short_llm)


def test_stop_token_ids_outside_vocab_fail_at_generate(short_llm):
    with pytest.raises(ValueError, match=_names("stop_token_ids")):
        short_llm.generate(
            "Hello", SamplingParams(max_tokens=2, stop_token_ids=[10**9]), use_tqdm=False
        )
    assert_engine_idle(short_llm)


def test_mismatched_sampling_params_and_priority_lists(short_llm):
    with pytest.raises(ValueError, match=_names("sampling_params")):
        short_llm.generate(["a", "b"], [greedy_params(2)] * 3, use_tqdm=False)
    with pytest.raises(ValueError, match=_names("priority")):
        short_llm.generate(["a", "b"], greedy_params(2), priority=[0], use_tqdm=False)
    assert_engine_idle(short_llm)


def _write_config(path, **overrides):
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg.update(overrides)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(tensor_parallel_size=3), "tensor_parallel_size"),  # 4 query / 2 KV heads
        (dict(tensor_parallel_size=0), "tensor_parallel_size"),
        (dict(block_size=0), "block_size"),
        (dict(max_model_len=10**6), "max_model_len"),
        (dict(dtype="int8"), "dtype"),
        (dict(load_format="onnx"), "load_format"),
        (dict(num_kv_blocks=0), "num_kv_blocks"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_engine_arguments_raise_before_any_work(tiny_ckpts, kwargs, field):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match=_names(field)):
        LLM(str(tiny_ckpts["llama"]), **kwargs)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_tensor_parallel_size_must_divide_kv_heads_too(tmp_path):
    # 8 query heads split in two, but 1 KV head does not.
    model = _write_config(tmp_path / "mqa", num_attention_heads=8, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size.*num_key_value_heads"):
        LLM(str(model), tensor_parallel_size=2, load_format="dummy", skip_tokenizer_init=True)


def test_missing_model_path(tmp_path):
    with pytest.raises(ValueError, match=_names("model")) as e:
        LLM(str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(e.value)


def test_directory_without_config_json(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=_names("model")) as e:
        LLM(str(tmp_path))
    assert "config.json" in str(e.value)


def test_unknown_engine_argument_is_a_type_error(tiny_ckpts):
    with pytest.raises(TypeError, match="tensor_paralel_size"):
        LLM(str(tiny_ckpts["llama"]), tensor_paralel_size=2)
