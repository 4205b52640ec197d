"""vLLM's SamplingParams and BeamSearchParams: same names, same defaults, validated when built."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from labkit.structured_params import GuidedDecodingParams, StructuredOutputsParams, as_structured
from labkit.utils import check_field

# Seeds as torch's generators take them; with n > 1, sequence i uses seed + i.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output holds all text and tokens so far
    DELTA = 1  # every output holds only what is new since the last one (streaming)
    FINAL_ONLY = 2  # only the finished output is returned


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
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: GuidedDecodingParams | None = None  # vLLM's older name for the same

    def __post_init__(self) -> None:
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError(
                    "guided_decoding: give structured_outputs or guided_decoding "
                    "(its older name), not both"
                )
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        self.structured_outputs = as_structured(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        check_field(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        check_field(
            _finite(self.temperature) and self.temperature >= 0,
            "temperature",
            self.temperature,
            "a finite number >= 0 (0 means greedy)",
        )
        check_field(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check_field(
            _is_int(self.top_k) and self.top_k >= -1,
            "top_k",
            self.top_k,
            "an integer >= -1 (0 or -1 turn it off)",
        )
        check_field(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        check_field(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            self.max_tokens,
            "an integer >= 1 (or None: up to max_model_len)",
        )
        check_field(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            self.min_tokens,
            "an integer >= 0",
        )
        check_field(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            f"<= max_tokens ({self.max_tokens})",
        )
        check_field(
            self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
            "logprobs",
            self.logprobs,
            "None or an integer >= 0",
        )
        check_field(
            all(isinstance(s, str) and s for s in self.stop),
            "stop",
            self.stop,
            "a non-empty string or a list of them",
        )
        check_field(
            all(_is_int(t) for t in self.stop_token_ids),
            "stop_token_ids",
            self.stop_token_ids,
            "a list of integers",
        )
        check_field(
            self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
            "seed",
            self.seed,
            f"None or an integer in [{SEED_MIN}, {SEED_MAX}]",
        )
        check_field(
            _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            self.presence_penalty,
            "in [-2, 2]",
        )
        check_field(
            _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            self.frequency_penalty,
            "in [-2, 2]",
        )
        check_field(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            self.repetition_penalty,
            "a finite number > 0",
        )
        check_field(
            self.prompt_logprobs is None
            or (_is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
            "prompt_logprobs",
            self.prompt_logprobs,
            "None or an integer >= 0",
        )
        if self.logit_bias is not None:
            try:
                bias = {_token_id(k): float(v) for k, v in self.logit_bias.items()}
            except (AttributeError, TypeError, ValueError):
                bias = None
            check_field(
                bias is not None and all(-100 <= v <= 100 for v in bias.values()),
                "logit_bias",
                self.logit_bias,
                "a dict of token id -> bias, each bias a number in [-100, 100]",
            )
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            check_field(
                len(self.allowed_token_ids) > 0 and all(_is_int(t) for t in self.allowed_token_ids),
                "allowed_token_ids",
                self.allowed_token_ids,
                "a non-empty list of token ids",
            )
        check_field(
            self.bad_words is None or all(isinstance(w, str) and w for w in self.bad_words),
            "bad_words",
            self.bad_words,
            "a list of non-empty strings",
        )

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )

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
        check_field(
            _is_int(self.beam_width) and self.beam_width >= 1,
            "beam_width",
            self.beam_width,
            "an integer >= 1",
        )
        check_field(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens",
            self.max_tokens,
            "an integer >= 1",
        )
        check_field(
            _finite(self.temperature) and self.temperature >= 0,
            "temperature",
            self.temperature,
            "a finite number >= 0",
        )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _token_id(key) -> int:
    """A logit_bias key: an int, or a string of one (JSON object keys are strings)."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(key)
    return int(key)
