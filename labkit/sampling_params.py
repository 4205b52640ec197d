"""vLLM's SamplingParams and BeamSearchParams: same names, same defaults, validated when built."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0   # every output holds all text and tokens so far
    DELTA = 1        # every output holds only what is new since the last one (streaming)
    FINAL_ONLY = 2   # only the finished output is returned


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 means greedy)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", self.top_k,
               "an integer >= -1 (0 or -1 turn it off)")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", self.max_tokens, "an integer >= 1 (or None: up to max_model_len)")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               self.min_tokens, "an integer >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
               "logprobs", self.logprobs, "None or an integer >= 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a non-empty string or a list of them")
        _check(all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a list of integers")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "None or an integer")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0")
        _check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
               "prompt_logprobs", self.prompt_logprobs, "None or an integer >= 0")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (AttributeError, TypeError, ValueError):
                _check(False, "logit_bias", self.logit_bias, "a dict of token id -> bias")
        if self.allowed_token_ids is not None:
            _check(len(self.allowed_token_ids) > 0 and all(isinstance(t, int) for t in self.allowed_token_ids),
                   "allowed_token_ids", self.allowed_token_ids, "a non-empty list of token ids")
        _check(self.bad_words is None or all(isinstance(w, str) and w for w in self.bad_words),
               "bad_words", self.bad_words, "a list of non-empty strings")

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.beam_width, int) and self.beam_width >= 1, "beam_width",
               self.beam_width, "an integer >= 1")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
               self.max_tokens, "an integer >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0")


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: must be {allowed}")
