"""Offline structured-output throughput (vLLM's benchmark_guided.py), and the workloads and
scoring it shares with the serving variant (serve_guided.py).

Datasets (`--dataset`), each `num_prompts` copies of one prompt and constraint:
  json         a user-profile JSON schema (or --json-schema-path), the schema in the prompt
  json-unique  the same, each request's schema made unique by one extra optional property, so
               no two requests share a compiled grammar (the compile cache's worst case)
  grammar      an EBNF grammar of small SQL queries
  regex        an e-mail address ending in a newline
  choice       Positive or Negative

A share `structured_output_ratio` of the requests (drawn with `seed`) is constrained, the rest
run free. Sampling as vLLM's: temperature 1, top-p 1, EOS ignored, `output_len` tokens at most;
a constrained request also ends when its grammar is complete, so the token counts are the ones
generated, not `num_prompts * output_len`. The comparison that prices the masks is
`--structured-output-ratio 1.0` against `0.0` (same prompts, same engine). correct_rate(%) is
the share of constrained outputs that parse (json), match (regex, grammar) or are a choice.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from labkit.bench import common
from labkit.observe.trace import trace_region

DATASETS = ("json", "json-unique", "grammar", "regex", "choice")

USER_PROFILE_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "maxLength": 60},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 40},
                "country": {"type": "string", "maxLength": 40},
            },
            "required": ["city", "country"],
        },
        "interests": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
    },
    "required": ["name", "email", "age", "role", "address"],
}
SQL_GRAMMAR = """
root ::= select_statement
select_statement ::= "SELECT " column " FROM " table " WHERE " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"""
SQL_PATTERN = r"SELECT (col_1|col_2)  FROM (table_1|table_2)  WHERE (col_1|col_2) = (1|2) "
EMAIL_REGEX = r"\w+@\w+\.com\n"
CHOICES = ["Positive", "Negative"]


@dataclass
class GuidedRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int
    kind: str  # the StructuredOutputsParams field: json, grammar, regex, choice
    constraint: object  # its value


def add_workload_args(p: argparse.ArgumentParser, num_prompts: int, output_len: int) -> None:
    """The flags both guided benchmarks share (vLLM's names)."""
    p.add_argument("--dataset", choices=DATASETS, default="json")
    p.add_argument(
        "--json-schema-path",
        "--json_schema_path",
        default=None,
        dest="json_schema_path",
        help="a JSON schema file for the json datasets",
    )
    p.add_argument("--num-prompts", type=int, default=num_prompts, dest="num_prompts")
    p.add_argument(
        "--output-len",
        type=int,
        default=output_len,
        dest="output_len",
        help="most output tokens per request",
    )
    p.add_argument(
        "--structured-output-ratio",
        "--guided-decoding-ratio",
        type=float,
        default=1.0,
        dest="structured_output_ratio",
        help="share of the requests that are constrained",
    )
    p.add_argument(
        "--no-structured-output",
        "--no-guided-decoding",
        action="store_true",
        dest="no_structured_output",
        help="constrain nothing (ratio 0)",
    )
    p.add_argument(
        "--save-results",
        action="store_true",
        dest="save_results",
        help="write the result JSON (with the outputs) even without --output-json",
    )


def add_args(p: argparse.ArgumentParser) -> None:
    add_workload_args(p, num_prompts=10, output_len=512)
    p.add_argument("--n", type=int, default=1, help="sequences per prompt")
    p.add_argument(
        "--warmup",
        action="store_true",
        help="run the first 5 requests (compiling their grammar) before timing",
    )
    common.add_offline_args(p)


def run(
    *,
    dataset: str = "json",
    json_schema_path: str | None = None,
    num_prompts: int = 10,
    output_len: int = 512,
    structured_output_ratio: float = 1.0,
    no_structured_output: bool = False,
    n: int = 1,
    warmup: bool = False,
    seed: int = 0,
    save_results: bool = False,
    profile: bool = False,
    profile_dir: str | None = None,
    output_json: str | None = None,
    save_step_log: bool = False,
    disable_tqdm: bool = False,
    llm=None,
    **engine_kwargs,
) -> dict:
    """vLLM's result: {"elapsed_time", "num_requests", "total_num_tokens",
    "total_output_tokens", "requests_per_second", "tokens_per_second",
    "output_tokens_per_second", "correct_rate(%)"} (the file also holds the outputs)."""
    from labkit import SamplingParams

    ratio = 0.0 if no_structured_output else check_ratio(structured_output_ratio)
    with common.engine(llm, seed, engine_kwargs) as llm:
        requests = sample_requests(
            llm.get_tokenizer(), dataset, num_prompts, output_len, json_schema_path, seed
        )
        constrained = constrained_indices(len(requests), ratio, seed)

        def params(i: int, r: GuidedRequest) -> SamplingParams:
            so = structured(r) if i in constrained else None
            return SamplingParams(
                n=n,
                temperature=1.0,
                top_p=1.0,
                ignore_eos=True,
                max_tokens=r.expected_output_len,
                structured_outputs=so,
            )

        if warmup:
            llm.generate(
                [r.prompt for r in requests[:5]],
                [params(i, r) for i, r in enumerate(requests[:5])],
                use_tqdm=False,
            )
        first = common.num_steps(llm)
        with trace_region("guided", profile, profile_dir):
            start = time.perf_counter()
            outputs = llm.generate(
                [r.prompt for r in requests],
                [params(i, r) for i, r in enumerate(requests)],
                use_tqdm=not disable_tqdm,
            )
            elapsed = time.perf_counter() - start
        result = common.generated_result(elapsed, outputs)
        texts = [o.outputs[0].text for o in outputs]
        picked = sorted(constrained)
        result["correct_rate(%)"] = correct_rate(
            [requests[i] for i in picked], [texts[i] for i in picked]
        )
        if save_results and not output_json:
            output_json = f"{ratio}guided_{dataset}_{num_prompts}_out{output_len}.json"
        # The file holds the outputs too, as vLLM's does; the returned dict does not.
        generated = [{"generated": t, "constrained": i in constrained} for i, t in enumerate(texts)]
        common.write_outputs(
            "guided",
            {"outputs": generated, **result},
            output_json=output_json,
            save_step_log=save_step_log,
            llm=llm,
            first_step=first,
        )
        return result


# ---- workloads and scoring ------------------------------------------------------------------
def sample_requests(
    tokenizer,
    dataset: str,
    num_prompts: int,
    output_len: int,
    json_schema_path: str | None,
    seed: int,
) -> list[GuidedRequest]:
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is invalid: must be one of {', '.join(DATASETS)}")
    if dataset in ("json", "json-unique"):
        schema = (
            json.loads(Path(json_schema_path).read_text())
            if json_schema_path
            else USER_PROFILE_SCHEMA
        )
        rng = random.Random(seed)
        schemas = []
        for _ in range(num_prompts):
            s = schema
            if dataset == "json-unique":
                s = copy.deepcopy(schema)
                s.setdefault("properties", {})[f"__optional_field_{rng.getrandbits(64):016x}"] = {
                    "type": "string",
                    "description": "a unique optional field: no shared cache",
                }
            schemas.append(s)
        prompts = [
            (
                "Generate an example of a brief user profile given the following schema: "
                + json.dumps(s),
                "json",
                s,
            )
            for s in schemas
        ]
    elif dataset == "grammar":
        prompts = [
            (
                "Generate an SQL query to show the 'username' and 'email' from the 'users' table.",
                "grammar",
                SQL_GRAMMAR,
            )
        ] * num_prompts
    elif dataset == "regex":
        prompts = [
            (
                "Generate an email address for Alan Turing, who works in Enigma. End in "
                ".com and new line. Example result: alan.turing@enigma.com\n",
                "regex",
                EMAIL_REGEX,
            )
        ] * num_prompts
    else:
        prompts = [
            ("Classify this sentiment: labkit is wonderful!", "choice", CHOICES)
        ] * num_prompts
    return [
        GuidedRequest(text, len(tokenizer(text).input_ids), output_len, kind, constraint)
        for text, kind, constraint in prompts
    ]


def structured(r: GuidedRequest):
    from labkit import StructuredOutputsParams

    return StructuredOutputsParams(**{r.kind: r.constraint})


def check_ratio(ratio: float) -> float:
    if not 0 <= ratio <= 1:
        raise ValueError(f"structured_output_ratio={ratio!r} is invalid: must be in [0, 1]")
    return ratio


def constrained_indices(num_requests: int, ratio: float, seed: int) -> set[int]:
    """Which requests are constrained: int(num_requests * ratio) of them, drawn with `seed`."""
    return set(random.Random(seed).sample(range(num_requests), int(num_requests * ratio)))


def is_correct(r: GuidedRequest, text: str) -> bool:
    if r.kind == "json":
        found = re.search(r"\{.*\}", text.replace("\n", "").strip())
        try:
            return found is not None and isinstance(json.loads(found.group()), dict)
        except ValueError:
            return False
    if r.kind == "choice":
        return text in r.constraint
    pattern = SQL_PATTERN if r.kind == "grammar" else r.constraint
    return re.fullmatch(pattern, text) is not None


def correct_rate(requests: list[GuidedRequest], texts: list[str]) -> float | None:
    """Percent of `texts` that satisfy their request's constraint (None with none)."""
    if not requests:
        return None
    return 100.0 * sum(is_correct(r, t) for r, t in zip(requests, texts)) / len(requests)
