"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with vLLM's type
names, so the `openai` client raises the matching exception class (BadRequestError, ...)."""

from __future__ import annotations

import re

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# labkit's ValueErrors start with the field they are about: "SamplingParams.top_p=2 is invalid"
# or "prompt: the prompt has ...".
_FIELD = re.compile(r"^(?:SamplingParams\.)?([A-Za-z_][A-Za-z_0-9]*)(?:=|: )")


class APIError(Exception):
    """Ends a request with an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    @classmethod
    def bad_request(cls, err: ValueError) -> APIError:
        """A labkit ValueError as a 400 naming the field it is about."""
        message = str(err)
        m = _FIELD.match(message)
        return cls(400, message, m.group(1) if m else None)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "Error"),
            "param": param,
            "code": status,
        }
    }
