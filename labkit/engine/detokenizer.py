"""Incremental detokenization: text deltas that are correct across multi-token characters.

Two implementations with the same deltas. `StreamDetokenizer`, for fast (Rust) tokenizers, is
tokenizers' own `DecodeStream`, a microsecond a token; at a few hundred running requests the
window decoder below costs milliseconds a step on the host, time the device may wait for.
`IncrementalDetokenizer`, for any tokenizer, decodes a short window of ids ending at the newest
token and emits only what is new; when the window ends in an incomplete UTF-8 sequence (U+FFFD),
it waits for the next token. Both start a few tokens back in the prompt, so that tokenizers that
drop a leading space decode the same as decoding everything at once.
"""

from __future__ import annotations

import tokenizers
from tokenizers.decoders import DecodeStream

_CONTEXT = 5


def incremental_detokenizer(tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
    """The fast detokenizer where the tokenizer has a Rust backend and decodes without
    `clean_up_tokenization_spaces` (a Python pass DecodeStream does not make), else the window
    decoder."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer) and not getattr(
        tokenizer, "clean_up_tokenization_spaces", False
    ):
        return StreamDetokenizer(backend, prompt_token_ids, skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)


class StreamDetokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, prompt_token_ids: list[int], skip: bool):
        self.backend = backend
        self.skip = skip
        self.stream = DecodeStream(skip_special_tokens=skip)
        for tok in prompt_token_ids[-_CONTEXT:]:  # their text is the prompt's, not output
            self._step(tok)

    def _step(self, token_id: int) -> str | None:
        try:
            return self.stream.step(self.backend, token_id)
        except Exception:
            # A token sequence whose bytes decode non-monotonically can leave the stream in a
            # state it rejects ("Invalid prefix encountered"): start a fresh one at this token.
            self.stream = DecodeStream(skip_special_tokens=self.skip)
            return self.stream.step(self.backend, token_id)

    def step(self, token_id: int) -> str:
        return self._step(token_id) or ""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""
