"""`labkit serve` with the default model: the quickstart's curl request, the official `openai`
client
(streamed and not), and the small endpoints. One real server process for the module."""

from __future__ import annotations

import json
import shutil
import subprocess

import openai
import pytest
from server_support import start_server

MODEL = "SmolLM2-135M-Instruct"  # the served name of the default model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), None, "--max-model-len", "2048")
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_seed_curl_request(server):
    body = {"model": MODEL, "prompt": "San Francisco is a", "max_tokens": 7, "temperature": 0}
    if shutil.which("curl"):
        out = subprocess.run(
            [
                "curl",
                "-s",
                f"{server.url}/v1/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps(body),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        resp = json.loads(out)
    else:
        status, resp = server.request("POST", "/v1/completions", body)
        assert status == 200
    assert resp["object"] == "text_completion" and resp["model"] == MODEL
    choice = resp["choices"][0]
    assert choice["text"] and choice["finish_reason"] == "length"
    assert resp["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}


def test_openai_completions_streamed_equals_whole(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.choices[0].text.startswith(" Paris")
    assert 0 < whole.usage.completion_tokens <= 8
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]


def test_openai_chat_streamed_equals_whole(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    whole = client.chat.completions.create(**kw)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and "Paris" in msg.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_and_extra_body_stream_like_whole(client):
    # A stop string may only complete a step or more after it starts: what a stream sent before
    # must still be a prefix of the final text.
    kw = dict(
        model=MODEL,
        prompt="Count: one, two, three,",
        max_tokens=24,
        temperature=0,
        stop=[" five", "\n\n"],
        extra_body={
            "top_k": 5,
            "min_tokens": 1,
            "ignore_eos": True,
            "include_stop_str_in_output": False,
        },
    )
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == whole.choices[0].text
    assert " five" not in whole.choices[0].text


def test_n_seed_and_logprobs(client):
    kw = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=5,
        temperature=1.0,
        n=3,
        seed=7,
        logprobs=2,
    )
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_models_version_health_tokenize(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, models = server.request("GET", "/v1/models")
    assert models["data"][0]["max_model_len"] == 2048
    assert server.request("GET", "/version")[1]["version"]
    assert server.request("GET", "/health")[0] == 200
    status, tok = server.request(
        "POST", "/tokenize", {"model": MODEL, "prompt": "San Francisco is a"}
    )
    assert status == 200 and tok["count"] == 4 and tok["max_model_len"] == 2048
    status, detok = server.request("POST", "/detokenize", {"model": MODEL, "tokens": tok["tokens"]})
    assert status == 200 and detok["prompt"] == "San Francisco is a"
    status, chat_tok = server.request(
        "POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}
    )
    assert status == 200 and chat_tok["count"] > 3
