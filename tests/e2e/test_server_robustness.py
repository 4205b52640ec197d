"""One `labkit serve` process (tiny checkpoint, --api-key) under load and bad input:
64 concurrent streaming clients batched by the one engine loop, a battery of bad requests, the
API key, clients that disconnect mid-request, and (last, it ends the server) a clean SIGTERM.

Batching is read from /metrics: `labkit:iteration_tokens_total` is a histogram of the tokens each
engine step computed. Every prompt here is under 16 tokens, so a step over 32 tokens can only
come from several HTTP requests sharing it."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import time

import openai
import pytest
from server_support import Server, sse_events, start_server

KEY = "sk-test-key"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpts):
    s = start_server(
        tmp_path_factory.mktemp("server"),
        str(tiny_ckpts["llama"]),
        "--served-model-name",
        "tiny",
        "tiny-alias",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--disable-log-requests",
        "--uvicorn-log-level",
        "warning",
        api_key=KEY,
    )
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


def _steps_over(m: dict[str, float], tokens: int) -> float:
    name = "labkit:iteration_tokens_total"
    return m[f"{name}_count"] - m[f'{name}_bucket{{le="{float(tokens)}"}}']


def test_64_concurrent_streams_batch_together(server):
    n_clients, max_tokens = 64, 8
    before = server.metrics()

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, str | None]:
        stream = await client.completions.create(
            model="tiny",
            prompt=f"Request number {i} says",
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage, finish = "", 0, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage, finish

    async def run_all():
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n_clients)))

    results = asyncio.run(run_all())
    assert len(results) == n_clients
    assert all(
        usage == max_tokens and finish == "length" and text for text, usage, finish in results
    )

    after = server.wait_idle()
    assert (
        after['labkit:request_success_total{finished_reason="length"}']
        - before['labkit:request_success_total{finished_reason="length"}']
        == n_clients
    )
    assert (
        after["labkit:generation_tokens_total"] - before["labkit:generation_tokens_total"]
        == n_clients * max_tokens
    )
    assert _steps_over(after, 32) - _steps_over(before, 32) >= 1, "requests never shared a step"
    steps = (
        after["labkit:iteration_tokens_total_count"] - before["labkit:iteration_tokens_total_count"]
    )
    assert steps < n_clients * max_tokens / 4, f"{steps} steps: requests ran mostly one by one"


def _json(body: object) -> tuple[bytes, dict]:
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
MSG = [{"role": "user", "content": "hi"}]

# (name, path, raw body, headers, expected status, expected error param or None)
BAD_REQUESTS = [
    ("malformed json", CMPL, b'{"prompt": "hi", ', {"Content-Type": "application/json"}, 400, None),
    ("json array", CMPL, *_json([1, 2]), 400, None),
    ("missing prompt", CMPL, *_json({"model": "tiny"}), 400, "prompt"),
    ("prompt wrong type", CMPL, *_json({"prompt": 5}), 400, "prompt"),
    ("mixed prompt list", CMPL, *_json({"prompt": ["a", [1]]}), 400, "prompt"),
    ("empty prompt", CMPL, *_json({"prompt": []}), 400, "prompt"),
    ("max_tokens wrong type", CMPL, *_json({**OK, "max_tokens": "many"}), 400, "max_tokens"),
    ("negative max_tokens", CMPL, *_json({**OK, "max_tokens": -1}), 400, "max_tokens"),
    ("n=0", CMPL, *_json({**OK, "n": 0}), 400, "n"),
    ("negative temperature", CMPL, *_json({**OK, "temperature": -0.5}), 400, "temperature"),
    ("top_p > 1", CMPL, *_json({**OK, "top_p": 2}), 400, "top_p"),
    ("negative logprobs", CMPL, *_json({**OK, "logprobs": -1}), 400, "logprobs"),
    ("min_tokens > max_tokens", CMPL, *_json({**OK, "min_tokens": 5}), 400, "min_tokens"),
    ("stop wrong type", CMPL, *_json({**OK, "stop": 3}), 400, "stop"),
    ("bad logit_bias", CMPL, *_json({**OK, "logit_bias": {"a": 1}}), 400, "logit_bias"),
    ("unsupported echo", CMPL, *_json({**OK, "echo": True}), 400, "echo"),
    ("unknown model", CMPL, *_json({**OK, "model": "nope"}), 404, "model"),
    ("prompt too long", CMPL, *_json({**OK, "prompt": [5] * MAX_MODEL_LEN}), 400, "prompt"),
    (
        "prompt + max_tokens too long",
        CMPL,
        *_json({**OK, "max_tokens": MAX_MODEL_LEN}),
        400,
        "max_tokens",
    ),
    ("token id out of vocab", CMPL, *_json({**OK, "prompt": [10**9]}), 400, "prompt_token_ids"),
    (
        "stream_options wrong type",
        CMPL,
        *_json({**OK, "stream": True, "stream_options": {"include_usage": "maybe"}}),
        400,
        "stream_options",
    ),
    ("oversized body", CMPL, *_json({**OK, "prompt": "x" * (5 << 20)}), 413, None),
    (
        "non-utf8 bytes",
        CMPL,
        b'{"prompt": "\xff\xfe"}',
        {"Content-Type": "application/json"},
        400,
        None,
    ),
    (
        "lone surrogate escape",
        CMPL,
        b'{"prompt": "a\\ud800b"}',
        {"Content-Type": "application/json"},
        400,
        None,
    ),
    (
        "wrong content type",
        CMPL,
        b"prompt=hello",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        None,
    ),
    ("chat without messages", CHAT, *_json({"model": "tiny"}), 400, "messages"),
    ("chat message without role", CHAT, *_json({"messages": [{"content": "hi"}]}), 400, "messages"),
    (
        "chat image content",
        CHAT,
        *_json(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            }
        ),
        400,
        "messages",
    ),
    (
        "chat top_logprobs without logprobs",
        CHAT,
        *_json({"messages": MSG, "top_logprobs": 2}),
        400,
        "top_logprobs",
    ),
    ("chat unknown model", CHAT, *_json({"model": "gpt-4", "messages": MSG}), 404, "model"),
    ("tokenize without prompt", "/tokenize", *_json({"model": "tiny"}), 400, "prompt"),
    ("detokenize out of vocab", "/detokenize", *_json({"tokens": [-1]}), 400, "tokens"),
]


@pytest.mark.parametrize(
    "name,path,body,headers,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_openai_error(server, name, path, body, headers, status, param):
    got, resp = server.request("POST", path, body, headers)
    assert got == status, resp
    err = resp["error"]
    assert (
        set(err) == {"message", "type", "param", "code"}
        and err["code"] == status
        and err["message"]
    )
    assert err["param"] == param, err
    if status == 404:
        assert err["message"] == f"The model `{json.loads(body)['model']}` does not exist."


def test_more_bad_requests_then_a_good_one(server):
    # Wrong method and unknown route: OpenAI's shape, not FastAPI's {"detail": ...}.
    for method, path, status in (("GET", CMPL, 405), ("POST", "/v1/nothing", 404)):
        got, resp = server.request(method, path)
        assert got == status and resp["error"]["code"] == status
    # An oversized body sent chunked, without Content-Length.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        CMPL,
        body=(b"x" * (1 << 20) for _ in range(6)),
        encode_chunked=True,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == 413
    conn.close()
    # The server is still fine: a valid request right after succeeds.
    got, resp = server.request("POST", CMPL, OK)
    assert got == 200 and resp["usage"]["completion_tokens"] == 2
    assert server.request("GET", "/health")[0] == 200
    server.wait_idle()


def test_api_key(server):
    body = {"model": "tiny-alias", "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, resp = server.request("POST", CMPL, body, headers, auth=False)
        assert status == 401 and resp["error"]["code"] == 401, (headers, resp)
    assert server.request("GET", "/v1/models", auth=False)[0] == 401
    status, resp = server.request("POST", CMPL, body)
    assert status == 200 and resp["model"] == "tiny-alias"
    assert server.request("GET", "/health", auth=False)[0] == 200  # only /v1/* needs the key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def _send(server: Server, body: dict, path: str = CMPL) -> socket.socket:
    """Send a request on a raw socket and leave the response unread."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _read_until(sock: socket.socket, marker: bytes, limit_s: float = 30) -> bytes:
    buf, deadline = b"", time.monotonic() + limit_s
    while marker not in buf:
        assert time.monotonic() < deadline, buf
        chunk = sock.recv(65536)
        assert chunk, buf
        buf += chunk
    return buf


def test_disconnected_clients_are_aborted(server):
    before = server.metrics()
    # Long enough that it could not finish by itself while the test waits for idle.
    long = {
        "model": "tiny",
        "prompt": "tell me everything",
        "max_tokens": MAX_MODEL_LEN - 16,
        "ignore_eos": True,
    }
    streams = [_send(server, {**long, "stream": True}) for _ in range(3)]
    for s in streams:
        _read_until(s, b"data: ")
    chat_stream = _send(
        server, {"messages": MSG, "max_tokens": 400, "ignore_eos": True, "stream": True}, CHAT
    )
    _read_until(chat_stream, b"data: ")
    whole = _send(server, long)  # not streamed: the server must notice the hang-up too
    deadline = time.monotonic() + 30
    while server.metrics()["labkit:num_requests_running"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for s in [*streams, chat_stream, whole]:
        s.close()
    after = server.wait_idle(timeout=10)
    assert (
        after['labkit:request_success_total{finished_reason="abort"}']
        - before['labkit:request_success_total{finished_reason="abort"}']
        == 5
    )
    got, resp = server.request("POST", CMPL, OK)
    assert got == 200


def test_sigterm_finishes_in_flight_requests_then_exits(server):
    """Last: it ends the module's server. One signal lets in-flight requests finish; a second
    ends the rest with an error chunk; then the engine shuts down and the process exits 0."""
    short = _send(
        server,
        {"model": "tiny", "prompt": "a", "max_tokens": 30, "ignore_eos": True, "stream": True},
    )
    long = _send(
        server,
        {
            "model": "tiny",
            "prompt": "b",
            "max_tokens": MAX_MODEL_LEN - 8,
            "ignore_eos": True,
            "stream": True,
        },
    )
    _read_until(short, b"data: ")
    _read_until(long, b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    events = sse_events(_read_until(short, b"data: [DONE]"))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert server.proc.poll() is None  # still draining the long request
    server.proc.send_signal(signal.SIGTERM)
    events = sse_events(_read_until(long, b"data: [DONE]"))
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503
    assert server.proc.wait(timeout=30) == 0
    assert "labkit server stopped" in server.log()
