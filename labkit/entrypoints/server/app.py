"""The FastAPI app: routes, API-key check, body parsing and OpenAI-shaped errors.

Bodies are parsed by hand rather than by FastAPI's parameter binding, so every way a body can be
wrong (too big, wrong content type, not UTF-8, not JSON, wrong fields) ends in one 4xx with
OpenAI's error shape, instead of FastAPI's 422 `{"detail": ...}`.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from labkit.entrypoints.server.errors import APIError, error_body
from labkit.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestBody,
    TokenizeRequest,
)
from labkit.entrypoints.server.serving import OpenAIServing
from labkit.observe.metrics import CONTENT_TYPE, ServerMetrics
from labkit.version import __version__

log = logging.getLogger("labkit.server")

# Far above any prompt that fits a context window (a 128k-token prompt is ~0.5 MB of text).
MAX_BODY_BYTES = 4 << 20

T = TypeVar("T", bound=RequestBody)


async def parse_body(raw: Request, model: type[T]) -> T:
    ctype = raw.headers.get("content-type")
    if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, not {ctype!r}")
    length = raw.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    body = bytearray()
    async for chunk in raw.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        data = json.loads(text)
        if "\\u" in text:
            # A \ud800-style escape can smuggle in a lone surrogate, which is no text at all
            # (the tokenizer would raise on it).
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    except UnicodeEncodeError:
        raise APIError(400, "the request body holds a lone UTF-16 surrogate escape") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


# Parts of a pydantic error location that name a member of a union type, not a field.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_error(e: ValidationError) -> APIError:
    """The first error, as `field.path: message`; a value that fits no member of a union type
    says which types would do."""

    def split(err) -> tuple[str, str | None]:
        """(path up to the first union member's tag, that tag), or (whole path, None)."""
        path = []
        for part in err["loc"]:
            if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part):
                return ".".join(path), part
            path.append(str(part))
        return ".".join(path), None

    errors = [(*split(err), err["msg"]) for err in e.errors()]
    path, tag, msg = errors[0]
    if tag is not None:
        msg = f"expected {' or '.join(dict.fromkeys(t for p, t, _ in errors if p == path and t))}"
    param = path.split(".")[0] or None
    return APIError(400, f"{path}: {msg}" if path else msg, param)


def _api_key_check(api_key: str):
    expected = f"Bearer {api_key}".encode()

    async def check(raw: Request) -> None:
        given = raw.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`")

    return check


def build_app(serving: OpenAIServing, metrics: ServerMetrics, api_key: str | None) -> FastAPI:
    app = FastAPI(title="labkit", version=__version__)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(api_key))] if api_key else [])

    @v1.post("/completions")
    async def completions(raw: Request) -> Response:
        return await serving.completions(await parse_body(raw, CompletionRequest), raw)

    @v1.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        return await serving.chat(await parse_body(raw, ChatCompletionRequest), raw)

    @v1.get("/models")
    async def models() -> dict:
        return serving.models()

    @v1.get("/models/{model_id:path}")  # names may hold a slash: org/name
    async def model(model_id: str) -> dict:
        return serving.model(model_id)

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> dict:
        return await serving.tokenize(await parse_body(raw, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(raw: Request) -> dict:
        return await serving.detokenize(await parse_body(raw, DetokenizeRequest))

    @app.get("/health")
    async def health() -> Response:
        if serving.engine.healthy:
            return Response(status_code=200)
        return JSONResponse(error_body(500, f"the engine is dead: {serving.engine.error}"), 500)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> Response:  # unknown route, wrong method
        return JSONResponse(
            error_body(e.status_code, str(e.detail)), e.status_code, headers=e.headers
        )

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> Response:
        log.error("unexpected error", exc_info=e)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), 500)

    return app
