"""Hostile requests against an OpenAI-compatible server: does any single request kill, freeze or
mislead it?

Each case is sent while `/health` is polled beside it; a row says what came back, whether the
error had OpenAI's shape and named the field, how long `/health` took at worst while the case
ran, and whether the server still served a plain request afterwards. The cases are the groups a
robustness review tries: requests that cost unbounded memory (huge logprobs, n), requests that
would run slow work on the server's event loop (request chat templates, a 3.9 MB prompt),
non-finite or out-of-range numbers, JSON values of the wrong kind, and the endpoints real
clients call (`/v1/models/{id}`).

    labkit bench hostile --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass

import aiohttp

HEALTH_BUDGET_S = 1.0
# A template whose rendering takes seconds of CPU: nested loops over a range.
SLOW_TEMPLATE = (
    "{% for a in range(3000) %}{% for b in range(3000) %}{% endfor %}{% endfor %}"
    "{{ messages[0]['content'] }}"
)


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: object = None  # a dict/list (sent as JSON) or raw str (sent as is)
    expect: int = 400  # the status a careful server answers
    param: str | None = None  # the field a 400 should name


@dataclass
class Row:
    case: str
    status: int
    expected: int
    openai_error: bool  # a 4xx/5xx with {"error": {"message", "type", ...}}
    param: str | None
    worst_health_s: float  # /health's slowest answer while the case ran
    healthy_after: bool  # /health 200 and a plain completion served afterwards

    @property
    def ok(self) -> bool:
        return (
            self.status == self.expected
            and self.healthy_after
            and self.worst_health_s < HEALTH_BUDGET_S
            and (self.status < 400 or self.openai_error)
        )


def cases(model: str) -> list[Case]:
    prompt450 = " ".join(["word"] * 450)
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": model, "prompt": "hi", "max_tokens": 2}
    return [
        # unbounded memory
        Case(
            "prompt_logprobs=49152",
            "POST",
            "/v1/completions",
            {**comp, "prompt": prompt450, "max_tokens": 1, "prompt_logprobs": 49152},
            param="prompt_logprobs",
        ),
        Case(
            "logprobs=100000",
            "POST",
            "/v1/completions",
            {**comp, "logprobs": 100000},
            param="logprobs",
        ),
        Case(
            "top_logprobs=50",
            "POST",
            "/v1/chat/completions",
            {**chat, "logprobs": True, "top_logprobs": 50},
            param="top_logprobs",
        ),
        Case("n=1000000000", "POST", "/v1/completions", {**comp, "n": 1_000_000_000}, param="n"),
        # slow work on the event loop
        Case(
            "request chat_template",
            "POST",
            "/v1/chat/completions",
            {**chat, "chat_template": SLOW_TEMPLATE},
            param="chat_template",
        ),
        Case(
            "/tokenize chat_template",
            "POST",
            "/tokenize",
            {"messages": chat["messages"], "chat_template": SLOW_TEMPLATE},
            param="chat_template",
        ),
        Case(
            "3.9 MB prompt",
            "POST",
            "/v1/completions",
            {**comp, "prompt": "lorem ipsum " * 330_000},
            param="prompt",
        ),
        # numbers
        Case(
            "logit_bias NaN",
            "POST",
            "/v1/completions",
            '{"prompt": "hi", "max_tokens": 2, "logit_bias": {"1": NaN}}',
            param="logit_bias",
        ),
        Case(
            "logit_bias Infinity",
            "POST",
            "/v1/completions",
            '{"prompt": "hi", "max_tokens": 2, "logit_bias": {"1": Infinity}}',
            param="logit_bias",
        ),
        Case(
            "temperature Infinity",
            "POST",
            "/v1/completions",
            '{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}',
            param="temperature",
        ),
        Case(
            "repetition_penalty Infinity",
            "POST",
            "/v1/completions",
            '{"prompt": "hi", "max_tokens": 2, "repetition_penalty": Infinity}',
            param="repetition_penalty",
        ),
        Case("seed 10**30", "POST", "/v1/completions", {**comp, "seed": 10**30}, param="seed"),
        Case(
            "max_tokens -1",
            "POST",
            "/v1/completions",
            {**comp, "max_tokens": -1},
            param="max_tokens",
        ),
        # values of the wrong kind
        Case(
            "prompt [true, false]",
            "POST",
            "/v1/completions",
            {**comp, "prompt": [True, False]},
            param="prompt",
        ),
        Case(
            "stream_options without stream",
            "POST",
            "/v1/completions",
            {**comp, "stream_options": {"include_usage": True}},
            param="stream_options",
        ),
        Case("not JSON", "POST", "/v1/completions", "{prompt: hi"),
        Case(
            "unknown model",
            "POST",
            "/v1/completions",
            {**comp, "model": "no-such-model"},
            expect=404,
            param="model",
        ),
        # what real clients call
        Case("GET /v1/models/{id}", "GET", f"/v1/models/{model}", expect=200),
        Case("GET /v1/models/missing", "GET", "/v1/models/missing", expect=404, param="model"),
    ]


async def _health(session: aiohttp.ClientSession, base: str) -> tuple[bool, float]:
    start = time.perf_counter()
    try:
        async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=30)) as r:
            return r.status == 200, time.perf_counter() - start
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False, time.perf_counter() - start


async def _send(session: aiohttp.ClientSession, base: str, case: Case, headers: dict):
    kwargs = {"headers": {**headers, "Content-Type": "application/json"}}
    if case.body is not None:
        kwargs["data"] = case.body if isinstance(case.body, str) else json.dumps(case.body)
    async with session.request(case.method, base + case.path, **kwargs) as r:
        text = await r.text()
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = None
    return r.status, body


async def _run_case(session, base: str, case: Case, model: str, headers: dict) -> Row:
    request = asyncio.ensure_future(_send(session, base, case, headers))
    worst = 0.0
    while not request.done():
        _, took = await _health(session, base)
        worst = max(worst, took)
        await asyncio.sleep(0.05)
    status, body = request.result()
    err = body.get("error") if isinstance(body, dict) else None
    shaped = isinstance(err, dict) and {"message", "type", "code"} <= set(err)
    healthy, took = await _health(session, base)
    plain = Case(
        "plain",
        "POST",
        "/v1/completions",
        {"model": model, "prompt": "hi", "max_tokens": 2},
        expect=200,
    )
    served = healthy and (await _send(session, base, plain, headers))[0] == 200
    return Row(
        case.name,
        status,
        case.expect,
        shaped,
        err.get("param") if shaped else None,
        max(worst, took),
        served,
    )


async def _run_all(base: str, model: str | None, api_key: str | None) -> list[Row]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        if model is None:
            async with session.get(base + "/v1/models", headers=headers) as r:
                model = (await r.json())["data"][0]["id"]
        return [await _run_case(session, base, c, model, headers) for c in cases(model)]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", dest="base_url")
    p.add_argument(
        "--model",
        default=None,
        help="model name to request (default: the server's first /v1/models entry)",
    )
    p.add_argument("--api-key", default=None, dest="api_key")


def run(
    *, base_url: str = "http://127.0.0.1:8000", model: str | None = None, api_key: str | None = None
) -> dict:
    """Every case against the server at `base_url`; prints the table and returns
    {"rows": [...], "passed": n, "failed": n}."""
    rows = asyncio.run(_run_all(base_url.rstrip("/"), model, api_key))
    print(f"{'request':32} {'status':>6} {'want':>5} {'param':>20} {'health':>8}  verdict")
    for r in rows:
        print(
            f"{r.case:32} {r.status:6d} {r.expected:5d} {str(r.param):>20} "
            f"{r.worst_health_s:7.2f}s  {'ok' if r.ok else 'FAILED'}"
            f"{'' if r.healthy_after else ' (server unhealthy after)'}"
        )
    passed = sum(r.ok for r in rows)
    return {
        "rows": [{**asdict(r), "ok": r.ok} for r in rows],
        "passed": passed,
        "failed": len(rows) - passed,
    }
