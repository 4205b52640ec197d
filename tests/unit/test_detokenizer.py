"""Incremental detokenization: the fast (tokenizers' DecodeStream) and the window decoder give
the same deltas, and together the text of decoding everything at once, on SmolLM2's and Qwen's
tokenizers: multi-byte characters split over tokens, special tokens kept or skipped, ids past the
tokenizer's vocabulary (a model's padded rows)."""

from __future__ import annotations

import pytest
from conftest import _load_tiny_builder
from transformers import AutoTokenizer

from labkit.engine.detokenizer import (
    IncrementalDetokenizer,
    StreamDetokenizer,
    incremental_detokenizer,
)

TEXT = 'Zoë said: {"name": "Zoë", "age": 42} 你好，世界。 🙂 — done.\n\tTabs\tand  spaces.'


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def tokenizer(request):
    builder = _load_tiny_builder()
    find = {"smollm2": builder.smollm2_tokenizer_dir, "qwen": builder.qwen_tokenizer_dir}
    return AutoTokenizer.from_pretrained(find[request.param]())


def _deltas(detok, ids: list[int]) -> list[str]:
    return [detok.step(t) for t in ids]


@pytest.mark.parametrize("skip", [True, False])
def test_fast_and_window_detokenizers_agree(tokenizer, skip):
    special = tokenizer.eos_token_id
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    ids = ids[:7] + [special] + ids[7:] + [len(tokenizer) + 3] + ids[:5]  # + an id past the vocab
    prompt = tokenizer.encode("The answer:", add_special_tokens=False)
    fast = incremental_detokenizer(tokenizer, prompt, skip)
    assert isinstance(fast, StreamDetokenizer)
    window = IncrementalDetokenizer(tokenizer, prompt, skip)
    got = _deltas(fast, ids)
    assert got == _deltas(window, ids)
    assert "".join(got) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_the_window_decoder_serves_tokenizers_that_clean_up_spaces(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True, raising=False)
    assert isinstance(incremental_detokenizer(tokenizer, [], True), IncrementalDetokenizer)
