"""Request bodies of the OpenAI API as pydantic models, with vLLM's extra sampling fields.

Unknown fields are kept (extra="allow") so the server can name them in a warning, as vLLM does,
instead of failing clients that send fields labkit ignores. Known fields that would change the
output but that labkit cannot honour (echo, suffix, tools, ...) are refused with a 400 rather
than silently ignored.

Structured outputs come in three spellings, at most one per request: OpenAI's `response_format`
(json_object, json_schema; vLLM's structural_tag), vLLM's `structured_outputs` object, and the
legacy `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, StrictInt

from labkit.entrypoints.server.errors import APIError
from labkit.sampling_params import RequestOutputKind, SamplingParams
from labkit.structured_params import StructuredOutputsParams

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(RequestBody):
    include_usage: bool | None = False


class SamplingRequest(RequestBody):
    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra fields.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    priority: int = 0
    # Structured outputs (see the module docstring).
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _unsupported(self) -> list[tuple[str, bool]]:
        """(field, whether this request uses it) for what labkit cannot do."""
        return []

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        for name, used in self._unsupported():
            if used:
                raise APIError(400, f"`{name}` is not supported by labkit", name)
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "stream_options: only allowed when stream is true", "stream_options"
            )
        given = {k: getattr(self, k) for k in _SAMPLING_FIELDS}
        kwargs = {k: v for k, v in given.items() if v is not None}
        structured = self._structured_outputs()
        try:
            # DELTA: the engine hands out only what is new, which is what a stream sends.
            return SamplingParams(
                max_tokens=max_tokens,
                logprobs=logprobs,
                output_kind=RequestOutputKind.DELTA,
                structured_outputs=structured,
                **kwargs,
            )
        except ValueError as e:
            raise APIError.bad_request(e) from None

    def structured_field(self) -> str | None:
        """The field this request's structured output came in (None: it has none)."""
        if self.response_format is not None and self.response_format.get("type") != "text":
            return "response_format"
        if self.structured_outputs is not None:
            return "structured_outputs"
        return next((f for f in GUIDED_FIELDS if getattr(self, f) is not None), None)

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        used = [
            f
            for f in ("response_format", "structured_outputs")
            if getattr(self, f)
            and not (f == "response_format" and self.response_format.get("type") == "text")
        ]
        guided = {
            f.removeprefix("guided_"): getattr(self, f)
            for f in GUIDED_FIELDS
            if getattr(self, f) is not None
        }
        if guided:
            used.append("guided_*")
        if len(used) > 1:
            raise APIError(
                400,
                f"{used[0]}: give one way of structured output, not {' and '.join(used)}",
                used[0],
            )
        if not used:
            return None
        field = self.structured_field()
        if field == "response_format":
            spec = _response_format(self.response_format)
        elif field == "structured_outputs":
            spec = dict(self.structured_outputs)
        else:
            spec = guided
            if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
                raise APIError(
                    400,
                    f"guided_decoding_backend: {self.guided_decoding_backend!r} "
                    "is not available; labkit's only backend is xgrammar",
                    "guided_decoding_backend",
                )
            if self.guided_whitespace_pattern is not None:
                spec["whitespace_pattern"] = self.guided_whitespace_pattern
        try:
            return StructuredOutputsParams(**spec)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), field) from None


def _response_format(rf: dict) -> dict:
    """OpenAI's response_format as StructuredOutputsParams' fields."""
    kind = rf.get("type")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(
                400,
                "response_format: json_schema.schema must be a JSON schema (an object)",
                "response_format",
            )
        return {"json": spec["schema"]}
    if kind == "structural_tag":
        return {"structural_tag": json.dumps(rf)}
    raise APIError(
        400,
        f"response_format: type {kind!r} is not supported; use text, "
        "json_object, json_schema or structural_tag",
        "response_format",
    )


# Fields passed to SamplingParams as they are (when given).
_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "prompt_logprobs",
)


class CompletionRequest(SamplingRequest):
    # StrictInt: JSON's true/false are no token ids.
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return super()._unsupported() + [
            ("echo", bool(self.echo)),
            ("suffix", bool(self.suffix)),
            ("best_of", self.best_of is not None and self.best_of != (self.n or 1)),
        ]

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class ContentPart(RequestBody):
    type: str
    text: str | None = None


class ChatMessage(RequestBody):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_template(self) -> dict:
        """The message as chat templates expect it: content as one string."""
        content = self.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"messages: content parts of type {part.type!r} are not "
                        "supported; labkit serves text-only models",
                        "messages",
                    )
            content = "\n".join(part.text for part in content)
        msg = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class _ChatTemplateFields(RequestBody):
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None


class ChatCompletionRequest(SamplingRequest, _ChatTemplateFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return super()._unsupported() + [("tools", bool(self.tools))]

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        return self._sampling_params(
            max_tokens, (self.top_logprobs or 0) if self.logprobs else None
        )


class TokenizeRequest(_ChatTemplateFields):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[StrictInt]
