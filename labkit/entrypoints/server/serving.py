"""The OpenAI endpoints' logic: turn a request body into prompts and SamplingParams, submit them
to the engine loop, and shape the updates as vLLM does (whole responses, or SSE chunks).

Tokenization and chat-template rendering happen here, with the server's own tokenizer (the
engine thread decodes with the engine's: HF tokenizers are not safe to share across threads), on
one worker thread of their own, never on the event loop: a 4 MB prompt or a slow template must
not stall /health or other clients. A request waits at most TOKENIZE_TIMEOUT_S for that work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from labkit.engine.input_processor import RequestLimits
from labkit.entrypoints.server.engine_loop import EngineLoop, RequestHandle
from labkit.entrypoints.server.errors import APIError
from labkit.entrypoints.server.formats import (
    ChatFormat,
    Choice,
    CompletionsFormat,
    Format,
    prompt_logprobs_body,
    sse,
    usage,
)
from labkit.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestBody,
    SamplingRequest,
    TokenizeRequest,
)
from labkit.sampling_params import SamplingParams

log = logging.getLogger("labkit.server")

TOKENIZE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServingOptions:
    model_names: list[str]
    model_root: str  # a directory AutoTokenizer.from_pretrained can load
    max_model_len: int
    limits: RequestLimits  # checked before a request's prompt is tokenized
    chat_template: str | None  # the server's (--chat-template), else the tokenizer's
    log_requests: bool = True
    trust_request_chat_template: bool = False  # vLLM's --trust-request-chat-template


class OpenAIServing:
    def __init__(self, engine: EngineLoop, tokenizer, options: ServingOptions):
        self.engine = engine
        self.tokenizer = tokenizer
        self.options = options
        self.model_names = options.model_names
        self.max_model_len = options.max_model_len
        self.created = int(time.time())
        # One thread: the tokenizer is used by one thread at a time.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="labkit-tokenize")

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` on the tokenizer's thread, bounded in time."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._tokenizer_thread, functools.partial(fn, *args, **kwargs))
        try:
            return await asyncio.wait_for(work, TOKENIZE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(
                400,
                f"preparing the prompt took longer than {TOKENIZE_TIMEOUT_S:.0f} s "
                "(tokenizing or rendering the chat template)",
            ) from None

    # ---- small endpoints ------------------------------------------------------------------------
    def check_model(self, body: RequestBody) -> None:
        name = getattr(body, "model", None)
        if name is not None and name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        if body.model_extra:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))

    def _model_card(self, name: str) -> dict:
        # `root` is a directory with the served tokenizer's files, so that clients which count
        # tokens (vLLM's benchmark client: --tokenizer) can load it.
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "labkit",
            "root": self.options.model_root,
            "parent": None,
            "max_model_len": self.max_model_len,
        }

    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card(name) for name in self.model_names]}

    def model(self, name: str) -> dict:
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return self._model_card(name)

    async def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of `prompt` and `messages`", "prompt")
        if req.prompt is not None:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await self._off_loop(
                self.tokenizer.encode, req.prompt, add_special_tokens=special
            )
        else:
            prompt = await self._off_loop(self._chat_prompt, req, bool(req.add_special_tokens))
            ids = prompt["prompt_token_ids"]
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req)
        vocab = len(self.tokenizer)
        if not all(0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens: every id must be in [0, {vocab})", "tokens")
        return {"prompt": await self._off_loop(self.tokenizer.decode, req.tokens)}

    # ---- prompts ------------------------------------------------------------------------------
    def _completion_prompts(self, req: CompletionRequest) -> list[dict]:
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise APIError(400, "prompt: the prompt is empty", "prompt")
        return [
            {"prompt": x, "prompt_token_ids": self.tokenizer.encode(x, add_special_tokens=True)}
            if isinstance(x, str)
            else {"prompt_token_ids": list(x)}
            for x in p
        ]

    def _chat_prompt(
        self, req: ChatCompletionRequest | TokenizeRequest, add_special_tokens: bool = False
    ) -> dict:
        if not req.messages:
            raise APIError(400, "messages: give at least one message", "messages")
        if req.chat_template is not None and not self.options.trust_request_chat_template:
            raise APIError(
                400,
                "chat_template: templates sent in a request are refused; start "
                "the server with --trust-request-chat-template to allow them",
                "chat_template",
            )
        messages = [m.to_template() for m in req.messages]
        try:
            # transformers renders in Jinja's immutable sandbox.
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                chat_template=req.chat_template or self.options.chat_template,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # a template that raises (bad roles, no template at all, ...)
            raise APIError(400, f"messages: the chat template failed: {e}", "messages") from None
        # The template already holds the special tokens: don't add a BOS on top.
        return {
            "prompt": text,
            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=add_special_tokens),
        }

    def _check_length(self, prompts: list[dict], params: SamplingParams) -> None:
        for p in prompts:
            n = len(p["prompt_token_ids"])
            if n >= self.max_model_len or (
                params.max_tokens is not None and n + params.max_tokens > self.max_model_len
            ):
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} "
                    f"tokens. However, you requested {n + (params.max_tokens or 0)} "
                    f"tokens ({n} in the prompt, {params.max_tokens or 0} in the "
                    "completion). Please reduce the length of the prompt or completion.",
                    "prompt" if n >= self.max_model_len else "max_tokens",
                )

    def _sampling_params(self, req: SamplingRequest, logprobs_field: str) -> SamplingParams:
        params = req.sampling_params()
        try:
            self.options.limits.check(params, logprobs_field)
        except ValueError as e:
            raise APIError.bad_request(e) from None
        return params

    # ---- generation ---------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.time()
        self.check_model(req)
        params = self._sampling_params(req, "logprobs")
        prompts = await self._off_loop(self._completion_prompts, req)
        return await self._generate(
            CompletionsFormat(req.logprobs),
            f"cmpl-{uuid.uuid4().hex}",
            req,
            prompts,
            params,
            arrival,
            raw,
        )

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.time()
        self.check_model(req)
        params = self._sampling_params(req, "top_logprobs")
        prompts = [await self._off_loop(self._chat_prompt, req)]
        return await self._generate(
            ChatFormat((req.top_logprobs or 0) if req.logprobs else None),
            f"chatcmpl-{uuid.uuid4().hex}",
            req,
            prompts,
            params,
            arrival,
            raw,
        )

    async def _generate(
        self,
        fmt: Format,
        request_id: str,
        req: SamplingRequest,
        prompts: list[dict],
        params: SamplingParams,
        arrival: float,
        raw: Request,
    ) -> Response:
        self._check_length(prompts, params)
        if self.options.log_requests:
            log.info(
                "request %s: %d prompt(s) of %s tokens, %s",
                request_id,
                len(prompts),
                [len(p["prompt_token_ids"]) for p in prompts],
                params,
            )
        try:
            handle = await self.engine.submit(request_id, prompts, params, arrival, req.priority)
        except ValueError as e:
            err = APIError.bad_request(e)
            if err.param == "structured_outputs":  # name the field the client used
                err.param = req.structured_field()
            raise err from None
        head = {
            "id": request_id,
            "created": int(arrival),
            "model": req.model or self.model_names[0],
        }
        num_prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        num_choices = len(prompts) * params.n
        if req.stream:
            chunks = self._stream(
                fmt, handle, head, num_choices, num_prompt_tokens, req.include_usage
            )
            return _SSEResponse(chunks, handle)
        try:
            choices = await _unless_disconnected(raw, _collect(handle, num_choices))
        finally:
            handle.close()
        if choices is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        completion_tokens = sum(len(c.token_ids) for c in choices)
        body = {
            **head,
            "object": fmt.object,
            "choices": [fmt.choice(i, c) for i, c in enumerate(choices)],
            "usage": usage(num_prompt_tokens, completion_tokens),
        }
        if isinstance(fmt, ChatFormat) and params.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_body(choices[0].prompt_logprobs)
        return JSONResponse(body)

    async def _stream(
        self,
        fmt: Format,
        handle: RequestHandle,
        head: dict,
        num_choices: int,
        num_prompt_tokens: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        chunk_head = {**head, "object": fmt.chunk_object}
        completion_tokens = 0
        offsets = [0] * num_choices  # characters sent so far per choice (completions' text_offset)
        started = [False] * num_choices
        try:
            async for update in handle:
                for d in update.choices:
                    completion_tokens += len(d.token_ids)
                    if d.text or d.finish_reason or (fmt.logprobs is not None and d.token_ids):
                        # A choice's first chunk goes out with its first token (chat: with the
                        # role), so a client's time to first token is the engine's.
                        choice = fmt.chunk_choice(d, offsets[d.index], first=not started[d.index])
                        started[d.index] = True
                        yield sse({**chunk_head, "choices": [choice]})
                    offsets[d.index] += len(d.text)
            if include_usage:
                yield sse(
                    {
                        **chunk_head,
                        "choices": [],
                        "usage": usage(num_prompt_tokens, completion_tokens),
                    }
                )
        except APIError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    """An SSE stream that aborts its request however the response ends: finished, failed, or
    cancelled because the client disconnected (even before the first chunk)."""

    def __init__(self, chunks: AsyncIterator[str], handle: RequestHandle):
        super().__init__(
            chunks,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.close()


async def _collect(handle: RequestHandle, num_choices: int) -> list[Choice]:
    choices = [Choice() for _ in range(num_choices)]
    async for update in handle:
        for d in update.choices:
            c = choices[d.index]
            c.text += d.text
            c.token_ids += d.token_ids
            c.logprobs += d.logprobs or []
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
            c.prompt_logprobs = c.prompt_logprobs or d.prompt_logprobs
    return choices


async def _unless_disconnected(raw: Request, work) -> list[Choice] | None:
    """Await `work`, or cancel it and return None if the client disconnects first."""

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


# ---- response shapes ----------------------------------------------------------------------------
