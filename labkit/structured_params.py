"""vLLM's StructuredOutputsParams (and the older GuidedDecodingParams spelling): what a request's
output must match, exactly one of a JSON schema, a regex, a choice list, a grammar (EBNF or Lark),
any JSON object, or a structural tag. Checked here for shape only; whether a schema, regex or
grammar compiles is the engine's check (labkit.engine.structured_output)."""

from __future__ import annotations

import json as _json
from dataclasses import dataclass

# The constraint fields, exactly one of which a request sets.
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema: a dict, its text, or a pydantic model
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF-style `root ::= ...`) or Lark
    json_object: bool | None = None  # any JSON object
    disable_fallback: bool = False  # accepted; labkit has one backend, never falls back
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens
    disable_additional_properties: bool = False  # accepted; xgrammar's strict mode already is
    whitespace_pattern: str | None = None  # outlines-only in vLLM: refused
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON text

    def __post_init__(self) -> None:
        if hasattr(self.json, "model_json_schema"):  # a pydantic model class
            self.json = self.json.model_json_schema()
        if self.json_object is False:
            self.json_object = None
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs: give exactly one of "
                + ", ".join(KINDS)
                + (f"; got {', '.join(given)}" if given else "; got none")
            )
        if isinstance(self.json, str):
            try:
                parsed = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs: json is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise ValueError("structured_outputs: json must be a JSON schema (an object)")
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(
                "structured_outputs: json must be a JSON schema: a dict, its JSON "
                f"text or a pydantic model class, not {type(self.json).__name__}"
            )
        choice = self.choice
        if choice is not None and (
            not isinstance(choice, (list, tuple))
            or not choice
            or not all(isinstance(c, str) for c in choice)
        ):
            raise ValueError("structured_outputs: choice must be a non-empty list of strings")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs: {name} must be a non-empty string")
        if self.whitespace_pattern is not None:
            raise ValueError(
                "structured_outputs: whitespace_pattern is not supported by labkit's "
                "backend (xgrammar); use disable_any_whitespace"
            )

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> str:
        """The constraint as one canonical string (the compile cache's key, with `kind`)."""
        value = getattr(self, self.kind)
        if self.kind == "json":
            value = _json.loads(value) if isinstance(value, str) else value
            return _json.dumps(value)  # key order kept: properties are generated in it
        if self.kind == "choice":
            return _json.dumps(list(value))
        return "" if self.kind == "json_object" else value


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's name before StructuredOutputsParams; `backend` may only name xgrammar."""

    backend: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in (None, "auto", "xgrammar"):
            raise ValueError(
                f"guided_decoding: backend={self.backend!r} is not available; "
                "labkit's only backend is xgrammar"
            )
        super().__post_init__()


def as_structured(value) -> StructuredOutputsParams | None:
    """StructuredOutputsParams from params, a dict of their fields, or None."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        try:
            return StructuredOutputsParams(**value)
        except TypeError as e:  # an unknown key
            raise ValueError(f"structured_outputs: {e}") from None
    raise ValueError(
        "structured_outputs: expected StructuredOutputsParams or a dict, got "
        f"{type(value).__name__}"
    )
