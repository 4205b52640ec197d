"""Structured outputs through `labkit serve` with the default model: OpenAI's response_format
(the `openai` client's parse() included), vLLM's structured_outputs object and guided_* fields,
streamed and whole; bad constraints are 400s naming the field and the server keeps serving; and
`labkit bench serve-guided` against the same server."""

from __future__ import annotations

import json
import re
from enum import Enum

import openai
import pydantic
import pytest
from server_support import start_server

from labkit.bench import serve_guided

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), None, "--max-model-len", "2048")
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Fruit(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    color: Color
    weight_grams: int = pydantic.Field(ge=1, le=1000)


def test_openai_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe an apple as JSON."}],
        response_format=Fruit,
        max_tokens=80,
        temperature=0,
    )
    msg = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Fruit) and 1 <= msg.parsed.weight_grams <= 1000


def test_response_format_on_completions_whole_and_streamed(client):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["answer", "confidence"],
    }
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": schema, "strict": True},
    }
    whole = client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer in JSON: ",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": fmt},
    )
    data = json.loads(whole.choices[0].text)
    assert data["answer"] in ("yes", "no") and 0 <= data["confidence"] <= 100
    stream = client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer in JSON: ",
        max_tokens=40,
        temperature=0,
        stream=True,
        extra_body={"response_format": fmt},
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a tiny JSON object with a name and an age."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "extra, check",
    [
        (
            {"guided_regex": r"[a-z]{3,8}@[a-z]{3,8}\.com"},
            lambda t: re.fullmatch(r"[a-z]{3,8}@[a-z]{3,8}\.com", t),
        ),
        ({"guided_choice": ["Positive", "Negative"]}, lambda t: t in ("Positive", "Negative")),
        (
            {"guided_grammar": 'root ::= "SELECT " ("id" | "name") " FROM users;"'},
            lambda t: t in ("SELECT id FROM users;", "SELECT name FROM users;"),
        ),
        (
            {
                "guided_json": {
                    "type": "object",
                    "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10}},
                    "required": ["n"],
                }
            },
            lambda t: 1 <= json.loads(t)["n"] <= 10,
        ),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ],
)
def test_vllm_extra_body_fields(client, extra, check):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick one, briefly."}],
        max_tokens=40,
        temperature=0.7,
        seed=1,
        n=2,
        extra_body=extra,
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop" and check(choice.message.content)


@pytest.mark.parametrize(
    "body, param, message",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                    },
                }
            },
            "response_format",
            "the json cannot be compiled",
        ),
        ({"guided_regex": "[a-"}, "guided_regex", "the regex cannot be compiled"),
        (
            {"guided_grammar": "root ::= missing"},
            "guided_grammar",
            "the grammar cannot be compiled",
        ),
        (
            {"structured_outputs": {"json": {"type": "object"}, "regex": "a"}},
            "structured_outputs",
            "give exactly one of",
        ),
        (
            {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
            "response_format",
            "give one way of structured output",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "type 'xml' is not supported"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(server, body, param, message):
    for path, base in (
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ):
        status, resp = server.request(
            "POST", path, {"model": MODEL, "max_tokens": 5, **base, **body}
        )
        assert status == 400, resp
        err = resp["error"]
        assert err["type"] == "BadRequestError" and err["param"] == param
        assert message in err["message"]
    status, resp = server.request(
        "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3}
    )
    assert status == 200 and resp["choices"][0]["text"]


def test_bench_serve_guided_against_the_server(server, tmp_path):
    result = serve_guided.run(
        base_url=server.url,
        dataset="choice",
        num_prompts=6,
        output_len=8,
        structured_output_ratio=1.0,
        save_results=True,
        result_dir=str(tmp_path),
        result_filename="guided.json",
        disable_tqdm=True,
    )
    saved = json.loads((tmp_path / "guided.json").read_text())
    for key in (
        "correct_rate(%)",
        "completed",
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "p99_itl_ms",
        "outputs",
    ):
        assert key in saved, key
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["correct_rate(%)"] == 100.0
    server.wait_idle()
