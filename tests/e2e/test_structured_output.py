"""Structured outputs on the default model: every kind of constraint holds under greedy and
random sampling, free requests are untouched by constrained neighbours, and the constraint
survives preemption, async scheduling, n > 1, logprobs and streaming."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from labkit import LLM, GuidedDecodingParams, RequestOutputKind, SamplingParams
from labkit import StructuredOutputsParams as SO
from tests.helpers import assert_engine_idle

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
}
REGEX = r"[a-z]{2,8}\.[a-z]{2,8}@[a-z]{3,8}\.(com|org)"
CHOICES = ["Positive", "Negative", "Neutral"]
GRAMMAR = """
root ::= "SELECT " columns " FROM " table ";"
columns ::= column (", " column)*
column ::= "id" | "name" | "email" | "age"
table ::= "users" | "orders"
"""
GRAMMAR_RE = r"SELECT (id|name|email|age)(, (id|name|email|age))* FROM (users|orders);"

CASES = {  # kind -> (prompt, constraint, max_tokens, check)
    # Compact JSON: free whitespace lets a 135M model at temperature 0.8 pad a document past
    # any short max_tokens (still a valid prefix, but unfinished).
    "json": (
        "Write a user profile as JSON: ",
        SO(json=SCHEMA, disable_any_whitespace=True),
        80,
        lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
    ),
    "regex": (
        "Alan Turing's email address is ",
        SO(regex=REGEX),
        30,
        lambda t: re.fullmatch(REGEX, t) is not None,
    ),
    "choice": (
        "Classify the sentiment of 'labkit is wonderful!': ",
        SO(choice=CHOICES),
        8,
        lambda t: t in CHOICES,
    ),
    "grammar": (
        "An SQL query for the users' names and emails: ",
        SO(grammar=GRAMMAR),
        40,
        lambda t: re.fullmatch(GRAMMAR_RE, t) is not None,
    ),
}
N = 50


def test_every_kind_holds_under_greedy_and_random_sampling(default_llm):
    prompts, params, expect = [], [], []
    for kind, (prompt, so, max_tokens, check) in CASES.items():
        for temperature in (0.0, 0.8):
            for i in range(N):
                prompts.append(prompt)
                params.append(
                    SamplingParams(
                        temperature=temperature,
                        max_tokens=max_tokens,
                        seed=i if temperature else None,
                        structured_outputs=so,
                    )
                )
                expect.append((kind, temperature, check))
    first = default_llm.engine.stats().num_steps
    outs = default_llm.generate(prompts, params, use_tqdm=False)
    bad = {}
    for out, (kind, temperature, check) in zip(outs, expect):
        c = out.outputs[0]
        try:
            ok = c.finish_reason == "stop" and check(c.text)
        except (ValueError, jsonschema.ValidationError):
            ok = False
        if not ok:
            bad.setdefault((kind, temperature), []).append(c.text)
    assert not bad, {k: (len(v), v[:2]) for k, v in bad.items()}
    # Random sampling did vary within the constraint.
    sampled = {o.outputs[0].text for o, e in zip(outs, expect) if e[:2] == ("json", 0.8)}
    assert len(sampled) > 10
    steps = default_llm.step_log()
    steps = steps[steps.step >= first]
    assert (steps.structured_ms > 0).all()  # every step had constrained rows to mask
    assert_engine_idle(default_llm)


def _free_and_constrained():
    free = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
    ]
    free_prompts = ["The capital of France is", "def fibonacci(n):"]
    constrained = [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=SO(json=SCHEMA)),
        SamplingParams(temperature=0, max_tokens=30, structured_outputs=SO(regex=REGEX)),
    ]
    return free_prompts, free, [CASES["json"][0], CASES["regex"][0]], constrained


def test_constrained_and_free_requests_do_not_change_each_other(default_llm):
    free_prompts, free, cons_prompts, cons = _free_and_constrained()
    alone_free = default_llm.generate(free_prompts, free, use_tqdm=False)
    alone_cons = [
        default_llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(cons_prompts, cons)
    ]
    mixed = default_llm.generate(
        [cons_prompts[0], free_prompts[0], cons_prompts[1], free_prompts[1]],
        [cons[0], free[0], cons[1], free[1]],
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in (mixed[1], mixed[3])] == [
        o.outputs[0].token_ids for o in alone_free
    ]
    # The same logprob entries, up to the float noise of a different batch shape.
    pairs = zip(mixed[3].outputs[0].logprobs, alone_free[1].outputs[0].logprobs)
    for mixed_pos, alone_pos in pairs:
        assert mixed_pos.keys() == alone_pos.keys()
        assert all(abs(mixed_pos[t].logprob - alone_pos[t].logprob) < 1e-4 for t in mixed_pos)
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == [
        o.outputs[0].token_ids for o in alone_cons
    ]
    json.loads(mixed[0].outputs[0].text)
    assert re.fullmatch(REGEX, mixed[2].outputs[0].text)


def test_async_scheduling_gives_the_synchronous_outputs(default_llm):
    """Under async scheduling a step's masks fill while the previous step's tokens are appended
    and checked: the outputs are still the synchronous engine's, constrained and free mixed,
    greedy and seeded, requests ending at different steps."""
    free_prompts, free, cons_prompts, cons = _free_and_constrained()
    grammar_prompt, grammar_so = CASES["grammar"][:2]
    choice_prompt, choice_so = CASES["choice"][:2]
    prompts = [*cons_prompts, *free_prompts, grammar_prompt, choice_prompt]
    params = [
        *cons,
        *free,
        SamplingParams(temperature=0.8, seed=3, max_tokens=40, structured_outputs=grammar_so),
        SamplingParams(temperature=0, max_tokens=8, structured_outputs=choice_so),
    ]
    ref = default_llm.generate(prompts, params, use_tqdm=False)
    with LLM(dtype="float32", async_scheduling=True) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert_engine_idle(llm)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert len({len(o.outputs[0].token_ids) for o in ref}) > 2  # they end apart


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preemption_and_async_scheduling_keep_the_constraint(default_llm, async_scheduling):
    """A KV cache too small for the batch preempts requests mid-output; their matchers keep
    the accepted tokens, so the recomputed requests decode exactly as without preemption."""
    prompt, so, _, check = CASES["json"]
    prompts = [prompt + "#" * i for i in range(8)]  # distinct prompts: no shared blocks
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=so)
    ref = default_llm.generate(prompts, params, use_tqdm=False)
    with LLM(
        dtype="float32", block_size=8, num_kv_blocks=24, async_scheduling=async_scheduling
    ) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        preemptions = llm.step_log().num_preemptions.sum()
        print(f"{preemptions} preemptions")
        assert preemptions > 0
        assert_engine_idle(llm)
    for o, r in zip(outs, ref):
        assert o.outputs[0].finish_reason == "stop" and check(o.outputs[0].text)
        assert o.outputs[0].token_ids == r.outputs[0].token_ids


def test_n_seeds_top_k_top_p_logprobs_and_stop_strings(default_llm):
    so = SO(choice=CHOICES)
    sp = SamplingParams(
        n=4,
        temperature=1.0,
        top_k=50,
        top_p=0.9,
        seed=7,
        logprobs=1,
        max_tokens=8,
        structured_outputs=so,
    )
    a, b = (default_llm.generate(CASES["choice"][0], sp, use_tqdm=False)[0] for _ in range(2))
    assert [c.text for c in a.outputs] == [c.text for c in b.outputs]  # seeded
    for c in a.outputs:
        assert c.text in CHOICES
        # Logprobs are of the masked distribution: finite, each token's among allowed ones.
        assert all(lp.logprob > float("-inf") for pos in c.logprobs for lp in pos.values())
    # A stop string cuts the constrained text as it would any other.
    stop = SamplingParams(
        temperature=0, max_tokens=30, stop=["@"], guided_decoding=GuidedDecodingParams(regex=REGEX)
    )
    c = default_llm.generate(CASES["regex"][0], stop, use_tqdm=False)[0].outputs[0]
    assert c.stop_reason == "@" and re.fullmatch(r"[a-z]{2,8}\.[a-z]{2,8}", c.text)


def test_streamed_deltas_concatenate_to_a_valid_document(default_llm):
    engine = default_llm.engine
    sp = SamplingParams(
        temperature=0.8,
        seed=3,
        max_tokens=80,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=SO(json=SCHEMA),
    )
    engine.add_request("stream-json", CASES["json"][0], sp)
    text, chunks = "", 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].text
            chunks += 1
    assert chunks > 5
    jsonschema.validate(json.loads(text), SCHEMA)


def test_a_compiling_grammar_waits_without_stalling_the_batch(default_llm):
    """Compiles queue behind a blocker on the compile thread: the constrained request waits
    outside the scheduler while a free one decodes; the same schema compiles once."""
    engine = default_llm.engine
    gate = threading.Event()
    engine.structured.state(SO(json_object=True))  # the compile thread exists
    engine.structured._thread.submit(gate.wait)
    schema = {**SCHEMA, "title": "waits"}  # new to the cache
    compiled = engine.structured.num_compiled
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("free", "Once upon a time", free)
    for k in range(2):
        engine.add_request(
            f"json-{k}",
            CASES["json"][0],
            SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=schema)),
        )
    assert engine.structured.num_compiled == compiled + 1
    done = {}
    for _ in range(5):
        for out in engine.step():
            done[out.request_id] = out
    try:
        assert engine.stats().num_waiting == 2 and engine.stats().num_running == 1
        assert "free" in done and len(done["free"].outputs[0].token_ids) >= 5
    finally:
        gate.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    for k in range(2):
        jsonschema.validate(json.loads(done[f"json-{k}"].outputs[0].text), schema)
    assert_engine_idle(default_llm)


@pytest.mark.parametrize(
    "so, detail",
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
        (dict(regex="[a-"), "regex"),
        (dict(grammar='root ::= "a" | undefined_rule'), "grammar"),
        (dict(grammar="start: (((("), "grammar"),
        (
            dict(structural_tag='{"structures": [{"begin": "<a>"}], "triggers": ["<a"]}'),
            "structural_tag",
        ),
    ],
)
def test_a_constraint_that_cannot_compile_is_a_value_error(default_llm, so, detail):
    sp = SamplingParams(max_tokens=4, structured_outputs=SO(**so))
    with pytest.raises(ValueError, match=rf"^structured_outputs: the {detail} cannot be compiled"):
        default_llm.generate(["ok prompt", "a bad one"], sp, use_tqdm=False)
    assert_engine_idle(default_llm)  # nothing of the batch was left behind
    out = default_llm.generate(
        "Hi",
        SamplingParams(max_tokens=3, structured_outputs=SO(choice=["yes", "no"])),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].text in ("yes", "no")
