"""No single request can kill, freeze or mislead the server: the hostile battery
(`labkit bench hostile`), the chat stream's first chunk, and property-based fuzzing of request
bodies, each against a real `labkit serve`."""

from __future__ import annotations

import json
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import sse_events, start_server

from labkit.bench import hostile

MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpts):
    s = start_server(
        tmp_path_factory.mktemp("hostile"),
        str(tiny_ckpts["llama"]),
        "--served-model-name",
        "org/tiny",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--disable-log-requests",
        "--uvicorn-log-level",
        "warning",
    )
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


def test_every_hostile_request_is_refused_and_the_server_keeps_serving(server):
    result = hostile.run(base_url=server.url)
    failed = [r for r in result["rows"] if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    named = {r["case"]: r["param"] for r in result["rows"]}
    assert named["prompt_logprobs=49152"] == "prompt_logprobs"
    assert named["seed 10**30"] == "seed" and named["prompt [true, false]"] == "prompt"


def test_models_endpoint_names_a_loadable_tokenizer(server):
    from transformers import AutoTokenizer

    status, card = server.request("GET", "/v1/models/org/tiny")
    assert status == 200 and card["id"] == "org/tiny"
    tok = AutoTokenizer.from_pretrained(card["root"])
    assert (
        tok.encode("hello") == server.request("POST", "/tokenize", {"prompt": "hello"})[1]["tokens"]
    )


def test_chat_stream_sends_the_role_with_the_first_token(server):
    body = json.dumps(
        {
            "model": "org/tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    events = [e for e in sse_events(raw) if e != "[DONE]"]
    first = events[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"]  # no empty role-only chunk
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:])


# ---- fuzzing --------------------------------------------------------------------------------
_any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
_SAMPLING_FIELDS = [
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "allowed_token_ids",
    "bad_words",
    "prompt_logprobs",
    "stream",
    "stream_options",
    "priority",
    "best_of",
    "echo",
    "model",
    "user",
]
_small_int = st.integers(1, 6)


@st.composite
def _body(draw, endpoint: str) -> dict:
    """A request body: a valid core (so that many reach the engine) with fields set to anything,
    valid-looking or not."""
    if endpoint == "completions":
        body = {
            "prompt": draw(
                st.text(max_size=40) | st.lists(st.integers(-5, 60000), max_size=8) | _any_value
            )
        }
    else:
        body = {"messages": draw(st.just([{"role": "user", "content": "hi"}]) | _any_value)}
    body["max_tokens"] = draw(_small_int | _any_value)
    for name in draw(st.lists(st.sampled_from(_SAMPLING_FIELDS), max_size=5, unique=True)):
        body[name] = draw(_any_value)
    if body.get("stream") is True:
        body.pop("n", None)  # many streamed choices only make the test slow
    return body


def _fuzz(server, endpoint: str, body: dict) -> None:
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    # allow_nan: NaN/Infinity go out as JavaScript literals, as sloppy clients send them.
    raw = json.dumps(body, allow_nan=True).encode()
    status, reply = server.request("POST", path, raw, {"Content-Type": "application/json"})
    assert status < 500, (body, reply)
    if status >= 400:
        err = reply["error"]
        assert {"message", "type", "param", "code"} <= set(err) and err["code"] == status
    start = time.perf_counter()
    assert server.request("GET", "/health")[0] == 200
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_fuzzed_bodies_never_break_the_server(server, endpoint):
    @settings(
        max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(body=_body(endpoint))
    def check(body):
        _fuzz(server, endpoint, body)

    check()
    status, reply = server.request(
        "POST", "/v1/completions", {"model": "org/tiny", "prompt": "hi", "max_tokens": 3}
    )
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    server.wait_idle()
