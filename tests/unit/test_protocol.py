"""The server's request models alone: bodies become SamplingParams with vLLM's field names, and
every refusal is a 400 naming its field."""

from __future__ import annotations

import pytest

from labkit.entrypoints.server.errors import APIError, error_body
from labkit.entrypoints.server.protocol import ChatCompletionRequest, CompletionRequest
from labkit.sampling_params import RequestOutputKind


def test_completion_fields_reach_sampling_params():
    req = CompletionRequest.model_validate(
        {
            "prompt": "hi",
            "max_tokens": 7,
            "temperature": 0,
            "top_k": 5,
            "stop": "x",
            "n": 2,
            "logprobs": 3,
            "logit_bias": {"11": 1.5},
            "min_tokens": 1,
        }
    )
    sp = req.sampling_params()
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.stop, sp.n, sp.logprobs) == (
        7,
        0,
        5,
        ["x"],
        2,
        3,
    )
    assert sp.logit_bias == {11: 1.5} and sp.min_tokens == 1
    assert sp.output_kind == RequestOutputKind.DELTA  # what a stream sends


def test_chat_uses_max_completion_tokens_and_top_logprobs():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "max_tokens": 4,
            "max_completion_tokens": 9,
            "logprobs": True,
            "top_logprobs": 2,
        }
    )
    sp = req.sampling_params()
    assert sp.max_tokens == 9 and sp.logprobs == 2
    assert req.messages[0].to_template() == {"role": "user", "content": "a\nb"}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
    ],
)
def test_refusals_are_400s_naming_the_field(body, param):
    with pytest.raises(APIError) as e:
        CompletionRequest.model_validate(body).sampling_params()
    assert e.value.status == 400 and e.value.param == param


def test_chat_refusals():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    for extra, param in (
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "structured_outputs"),
    ):
        with pytest.raises(APIError) as e:
            ChatCompletionRequest.model_validate({**base, **extra}).sampling_params()
        assert e.value.param == param
    image = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    with pytest.raises(APIError, match="image_url"):
        ChatCompletionRequest.model_validate(image).messages[0].to_template()


def test_structured_output_spellings_become_structured_outputs_params():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for extra, kind in (
        ({"response_format": {"type": "json_object"}}, "json_object"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema, "strict": True},
                }
            },
            "json",
        ),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar"),
        ({"guided_choice": ["a", "b"]}, "choice"),
        ({"guided_json": schema}, "json"),
    ):
        sp = ChatCompletionRequest.model_validate({**base, **extra}).sampling_params()
        assert sp.structured_outputs.kind == kind
    text = ChatCompletionRequest.model_validate({**base, "response_format": {"type": "text"}})
    assert text.sampling_params().structured_outputs is None


def test_error_body_has_openais_shape():
    assert error_body(404, "no such model") == {
        "error": {"message": "no such model", "type": "NotFoundError", "param": None, "code": 404}
    }
    err = APIError.bad_request(ValueError("max_tokens=0 is invalid: must be an integer >= 1"))
    assert (err.status, err.param) == (400, "max_tokens")
