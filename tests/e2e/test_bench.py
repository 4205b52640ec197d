"""labkit.bench: every benchmark from Python and from `labkit bench`, with vLLM's JSON keys and
values that agree with each other; the random dataset's exact lengths; --profile traces; the
hf backend; the serving client against a real `labkit serve` and against a server that is down."""

from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from labkit import EngineConfig, cli
from labkit.bench import (
    datasets,
    latency,
    long_doc_qa,
    prefix_caching,
    prioritization,
    serve,
    throughput,
)

LATENCY_KEYS = {"avg_latency", "latencies", "percentiles"}
THROUGHPUT_KEYS = {
    "elapsed_time",
    "num_requests",
    "total_num_tokens",
    "requests_per_second",
    "tokens_per_second",
    "total_output_tokens",
    "output_tokens_per_second",
}
CACHE_KEYS = THROUGHPUT_KEYS | {"num_cached_tokens"}
SERVE_KEYS = {
    "date",
    "backend",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
}
QUIET = dict(disable_tqdm=True)


def serve_metric_keys(metrics: list[str], percentiles: list[str]) -> set[str]:
    return {
        f"{s}_{m}_ms"
        for m in metrics
        for s in ["mean", "median", "std"] + [f"p{p}" for p in percentiles]
    }


def check_throughput(r: dict, num_requests: int, prompt_tokens: int, output_tokens: int) -> None:
    assert r["num_requests"] == num_requests
    assert r["total_output_tokens"] == output_tokens
    assert r["total_num_tokens"] == prompt_tokens + output_tokens
    assert r["elapsed_time"] > 0
    assert r["tokens_per_second"] == pytest.approx(r["total_num_tokens"] / r["elapsed_time"])
    assert r["requests_per_second"] == pytest.approx(num_requests / r["elapsed_time"])
    assert r["output_tokens_per_second"] == pytest.approx(output_tokens / r["elapsed_time"])


@pytest.fixture(scope="module")
def tiny(tiny_ckpts) -> str:
    return str(tiny_ckpts["llama"])


@pytest.fixture(scope="module")
def llm(tiny_llms):
    return tiny_llms("llama")


# ---- the random dataset ---------------------------------------------------------------------
def test_random_prompts_have_exactly_the_requested_lengths(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    space = datasets.token_space(49152, tok)
    assert not set(tok.all_special_ids) & set(space.tolist())
    reqs = datasets.random_requests(
        space, 50, input_len=40, output_len=10, range_ratio=0.5, prefix_len=7, seed=3
    )
    for r in reqs:
        assert 7 + 20 <= r.prompt_len <= 7 + 60 and 5 <= r.expected_output_len <= 15
        assert r.prompt_token_ids[:7] == reqs[0].prompt_token_ids[:7]  # the shared prefix
        assert not set(r.prompt_token_ids) & set(tok.all_special_ids)
    assert len({r.prompt_len for r in reqs}) > 10  # lengths do vary
    exact = datasets.random_requests(space, 5, input_len=33, output_len=4, seed=1)
    assert [r.prompt_len for r in exact] == [33] * 5 and [r.expected_output_len for r in exact] == [
        4
    ] * 5
    again = datasets.random_requests(
        space, 50, input_len=40, output_len=10, range_ratio=0.5, prefix_len=7, seed=3
    )
    assert again == reqs  # reproducible from the seed
    assert datasets.random_requests(space, 50, 40, 10, 0.5, 7, seed=4) != reqs
    with pytest.raises(ValueError, match="random_range_ratio"):
        datasets.random_requests(space, 1, 8, 8, range_ratio=1.0)
    with pytest.raises(ValueError, match="input_len"):
        datasets.load(
            "random", vocab_size=49152, tokenizer=tok, num_prompts=2, input_len=None, output_len=4
        )


def test_sharegpt_dataset(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    convs = [
        {
            "conversations": [
                {"from": "human", "value": f"Question number {i}: what is {i} plus {i}?"},
                {"from": "gpt", "value": f"The answer is that {i} plus {i} makes {2 * i}."},
            ]
        }
        for i in range(6)
    ] + [{"conversations": [{"from": "human", "value": "alone"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    reqs = datasets.load(
        "sharegpt",
        vocab_size=49152,
        tokenizer=tok,
        num_prompts=4,
        input_len=None,
        output_len=None,
        dataset_path=str(path),
    )
    assert len(reqs) == 4
    for r in reqs:
        assert r.prompt_token_ids == tok(r.prompt).input_ids and r.expected_output_len >= 4
    with pytest.raises(ValueError, match="only 6 usable"):
        datasets.load(
            "sharegpt",
            vocab_size=49152,
            tokenizer=tok,
            num_prompts=7,
            input_len=None,
            output_len=3,
            dataset_path=str(path),
        )


def test_repeat_modes():
    rng = np.random.default_rng(0)
    assert long_doc_qa.repeat(["a", "b"], 2, "tile", rng) == ["a", "b", "a", "b"]
    assert long_doc_qa.repeat(["a", "b"], 2, "interleave", rng) == ["a", "a", "b", "b"]
    assert sorted(long_doc_qa.repeat(["a", "b"], 3, "random", rng)) == ["a"] * 3 + ["b"] * 3


# ---- the offline benchmarks from Python -----------------------------------------------------
def test_latency(llm, tmp_path):
    out = tmp_path / "lat.json"
    r = latency.run(
        llm=llm,
        batch_size=2,
        input_len=16,
        output_len=4,
        num_iters_warmup=1,
        num_iters=3,
        output_json=str(out),
        **QUIET,
    )
    assert set(r) == LATENCY_KEYS and json.loads(out.read_text()) == r
    assert len(r["latencies"]) == 3 and r["avg_latency"] == pytest.approx(np.mean(r["latencies"]))
    assert list(r["percentiles"]) == ["10", "25", "50", "75", "90", "99"]
    values = list(r["percentiles"].values())
    assert values == sorted(values) and min(r["latencies"]) <= values[0] <= values[-1] <= max(
        r["latencies"]
    )
    steps = (tmp_path / "lat.steps.csv").read_text().splitlines()
    # The timed region only: 3 iterations of 4 tokens, about a step per token (not the warm-up's).
    assert steps[0].startswith("step,") and 3 * 4 <= len(steps) - 1 <= 3 * 5


def test_latency_beam_search(llm):
    r = latency.run(
        llm=llm,
        batch_size=1,
        input_len=8,
        output_len=3,
        n=2,
        use_beam_search=True,
        num_iters_warmup=0,
        num_iters=1,
        **QUIET,
    )
    assert set(r) == LATENCY_KEYS and len(r["latencies"]) == 1


def test_throughput_random(llm):
    r = throughput.run(
        llm=llm,
        input_len=12,
        output_len=4,
        num_prompts=6,
        n=2,
        random_range_ratio=0.5,
        prefix_len=3,
        seed=5,
        **QUIET,
    )
    reqs = datasets.load(
        "random",
        vocab_size=llm.config.model_config.vocab_size,
        tokenizer=llm.get_tokenizer(),
        num_prompts=6,
        input_len=12,
        output_len=4,
        range_ratio=0.5,
        prefix_len=3,
        seed=5,
    )
    assert set(r) == THROUGHPUT_KEYS
    check_throughput(
        r, 6, sum(q.prompt_len for q in reqs), 2 * sum(q.expected_output_len for q in reqs)
    )


def test_throughput_sharegpt(llm, tmp_path):
    convs = [
        {
            "conversations": [
                {"from": "human", "value": f"Tell me a fact about the number {i}, please."},
                {"from": "gpt", "value": "Here is a fact."},
            ]
        }
        for i in range(3)
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    r = throughput.run(
        llm=llm,
        dataset_name="sharegpt",
        dataset_path=str(path),
        num_prompts=3,
        output_len=4,
        **QUIET,
    )
    assert set(r) == THROUGHPUT_KEYS and r["total_output_tokens"] == 12


def test_prioritization(llm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = prioritization.run(
        llm=llm, input_len=10, output_len=4, num_prompts=5, save_step_log=True, **QUIET
    )
    assert set(r) == THROUGHPUT_KEYS
    check_throughput(r, 5, 50, 20)
    assert len((tmp_path / "prioritization.steps.csv").read_text().splitlines()) >= 1 + 4
    assert set(prioritization.random_priorities(200, 0)) == {0, 1}


def test_prefix_caching(llm):
    r = prefix_caching.run(
        llm=llm,
        input_length_range="20:40",
        num_prompts=2,
        repeat_count=3,
        output_len=3,
        sort=True,
        **QUIET,
    )
    assert set(r) == CACHE_KEYS and r["num_requests"] == 6
    assert 6 * 20 + 6 * 3 <= r["total_num_tokens"] <= 6 * 40 + 6 * 3
    with pytest.raises(ValueError, match="input_length_range"):
        prefix_caching.run(llm=llm, input_length_range="40-20", **QUIET)


def test_long_doc_qa_reuses_documents(tiny):
    """Its own engine (from engine kwargs), one request at a time: with prefix caching each
    second ask of a document (d0 d0 d1 d1) finds the document's full blocks cached."""
    r = long_doc_qa.run(
        model=tiny,
        dtype="float32",
        max_num_seqs=1,
        document_length=48,
        num_documents=2,
        repeat_count=2,
        output_len=3,
        repeat_mode="interleave",
        **QUIET,
    )
    assert set(r) == CACHE_KEYS and r["num_requests"] == 4
    assert r["total_num_tokens"] - r["total_output_tokens"] == 4 * 48
    if "enable_prefix_caching" in {f.name for f in dataclasses.fields(EngineConfig)}:
        assert (
            r["num_cached_tokens"] >= 2 * 32
        )  # 2 of 3 blocks: the last prompt token is recomputed


def test_profile_writes_a_labelled_trace(llm, tmp_path):
    latency.run(
        llm=llm,
        batch_size=1,
        input_len=8,
        output_len=2,
        num_iters_warmup=0,
        num_iters=1,
        profile=True,
        profile_dir=str(tmp_path),
        **QUIET,
    )
    [trace] = tmp_path.glob("latency-*.trace.json.gz")
    names = {e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
    assert {"schedule", "forward", "sample"} <= names
    [table] = tmp_path.glob("latency-*.ops.txt")
    assert "forward" in table.read_text()


def test_engine_kwargs_with_llm_are_refused(llm):
    with pytest.raises(ValueError, match="block_size"):
        latency.run(llm=llm, block_size=32, **QUIET)


# ---- from the command line ------------------------------------------------------------------
def run_cli(capsys, *argv: str) -> dict:
    assert cli.main(["bench", *argv, "--disable-tqdm"]) == 0
    return json.loads(capsys.readouterr().out)


def test_latency_cli_tensor_parallel(tiny, tmp_path, capsys):
    """The issue's command but for the paths, a quiet progress bar and 1 warm-up iteration
    instead of 10 (two CPU cores)."""
    out = tmp_path / "x.json"
    r = run_cli(
        capsys,
        "latency",
        "--model",
        tiny,
        "--batch-size",
        "2",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--num-iters",
        "2",
        "--tensor_parallel_size",
        "2",
        "--output-json",
        str(out),
        "--num-iters-warmup",
        "1",
    )
    assert set(r) == LATENCY_KEYS and len(r["latencies"]) == 2 and json.loads(out.read_text()) == r


@pytest.mark.parametrize(
    "argv, keys",
    [
        (
            ["throughput", "--input-len", "8", "--output-len", "3", "--num-prompts", "3"],
            THROUGHPUT_KEYS,
        ),
        (
            ["prioritization", "--input-len", "8", "--output-len", "3", "--num-prompts", "3"],
            THROUGHPUT_KEYS,
        ),
        (
            [
                "prefix-caching",
                "--input-length-range",
                "8:16",
                "--repeat-count",
                "2",
                "--output-len",
                "2",
                "--sort",
                "--no-enable-prefix-caching",
            ],
            CACHE_KEYS,
        ),
        (
            [
                "long-doc-qa",
                "--document-length",
                "24",
                "--num-documents",
                "2",
                "--output-len",
                "2",
                "--repeat-mode",
                "tile",
            ],
            CACHE_KEYS,
        ),
    ],
)
def test_commands_from_cli(tiny, tmp_path, capsys, argv, keys):
    out = tmp_path / "r.json"
    r = run_cli(capsys, *argv, "--model", tiny, "--max-model-len", "256", "--output-json", str(out))
    assert set(r) == keys and json.loads(out.read_text()) == r
    assert (tmp_path / "r.steps.csv").exists()


def test_hf_backend_runs_the_same_workload(tiny, tmp_path, capsys):
    argv = [
        "throughput",
        "--model",
        tiny,
        "--input-len",
        "10",
        "--output-len",
        "4",
        "--num-prompts",
        "5",
        "--n",
        "2",
        "--random-range-ratio",
        "0.3",
        "--seed",
        "7",
    ]
    hf = run_cli(capsys, *argv, "--backend", "hf", "--hf-max-batch-size", "2")
    ours = run_cli(capsys, *argv)
    assert set(hf) == set(ours) == THROUGHPUT_KEYS
    for key in ("num_requests", "total_num_tokens", "total_output_tokens"):
        assert hf[key] == ours[key]
    check_throughput(
        hf, 5, hf["total_num_tokens"] - hf["total_output_tokens"], hf["total_output_tokens"]
    )


# ---- serving --------------------------------------------------------------------------------
def test_serve_against_a_down_server(tiny, capsys):
    from labkit.utils import free_port  # nothing listens there

    r = run_cli(
        capsys,
        "serve",
        "--port",
        str(free_port()),
        "--tokenizer",
        tiny,
        "--num-prompts",
        "5",
        "--random-input-len",
        "8",
        "--random-output-len",
        "4",
        "--percentile-metrics",
        "ttft,e2el",
    )
    assert set(r) == SERVE_KEYS | serve_metric_keys(["ttft", "e2el"], ["99"])
    assert (r["completed"], r["failed"], r["total_output_tokens"], r["request_throughput"]) == (
        0,
        5,
        0,
        0.0,
    )


def test_serve_against_labkit_server(tiny, tmp_path_factory):
    from server_support import start_server

    server = start_server(tmp_path_factory.mktemp("bench-serve"), tiny, "--disable-log-requests")
    out = tmp_path_factory.mktemp("bench-serve-result")
    try:
        r = serve.run(
            base_url=server.url,
            num_prompts=8,
            random_input_len=16,
            random_output_len=6,
            ignore_eos=True,
            request_rate=40.0,
            burstiness=0.5,
            max_concurrency=4,
            percentile_metrics="ttft,tpot,itl,e2el",
            metric_percentiles="50,99",
            goodput=["ttft:60000", "e2el:60000"],
            save_result=True,
            result_dir=str(out),
            result_filename="serve.json",
            **QUIET,
        )
    finally:
        assert server.stop() == 0, server.log()
    assert set(r) == SERVE_KEYS | serve_metric_keys(["ttft", "tpot", "itl", "e2el"], ["50", "99"])
    assert json.loads((out / "serve.json").read_text()) == r
    assert (r["completed"], r["failed"]) == (8, 0)
    assert r["model_id"] == tiny and r["tokenizer_id"] == tiny
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (8 * 16, 8 * 6)
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < r[f"median_{m}_ms"] == r[f"p50_{m}_ms"] <= r[f"p99_{m}_ms"]
    assert r["mean_ttft_ms"] < r["mean_e2el_ms"]
    # TPOT is (E2EL - TTFT) / (output tokens - 1), averaged over requests.
    assert r["mean_tpot_ms"] == pytest.approx((r["mean_e2el_ms"] - r["mean_ttft_ms"]) / 5)
