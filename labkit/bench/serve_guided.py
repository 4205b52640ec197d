"""Serving throughput with structured outputs (vLLM's benchmark_serving_structured_output.py,
the serving side of `labkit bench guided`).

The guided workloads (guided.py: json, json-unique, grammar, regex, choice) sent by serve.py's
client to any server that takes vLLM's guided_json / guided_regex / guided_choice /
guided_grammar fields: a share `structured_output_ratio` of the requests carries its constraint.
The result is serve.py's (throughputs, TTFT, TPOT, ITL, E2EL) plus "correct_rate(%)" over the
constrained requests and, in the saved file, every output.
"""

from __future__ import annotations

import argparse

from labkit.bench import common, datasets, guided, serve, serve_metrics


def add_args(p: argparse.ArgumentParser) -> None:
    serve.add_client_args(p)
    guided.add_workload_args(p, num_prompts=1000, output_len=128)


def run(
    *,
    backend: str = "openai",
    base_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    endpoint: str = "/v1/completions",
    model: str | None = None,
    tokenizer: str | None = None,
    dataset: str = "json",
    json_schema_path: str | None = None,
    num_prompts: int = 1000,
    output_len: int = 128,
    structured_output_ratio: float = 1.0,
    no_structured_output: bool = False,
    request_rate: float = float("inf"),
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
    percentile_metrics: str = "ttft,tpot,itl",
    metric_percentiles: str = "99",
    goodput: list[str] | None = None,
    save_results: bool = False,
    result_dir: str | None = None,
    result_filename: str | None = None,
    seed: int = 0,
    disable_tqdm: bool = False,
) -> dict:
    """serve.run's result dict plus "correct_rate(%)" (the saved file adds "outputs")."""
    metrics, ps, slos = serve_metrics.parse_options(
        percentile_metrics, metric_percentiles, goodput, request_rate, burstiness
    )
    ratio = 0.0 if no_structured_output else guided.check_ratio(structured_output_ratio)
    base = (base_url or f"http://{host}:{port}").rstrip("/")
    model_id = model or serve.run_async(serve.served_model(base))
    tok, tokenizer_id = common.load_tokenizer(tokenizer, model_id)
    workload = guided.sample_requests(tok, dataset, num_prompts, output_len, json_schema_path, seed)
    constrained = guided.constrained_indices(len(workload), ratio, seed)
    requests = [
        datasets.SampleRequest(tok(r.prompt).input_ids, r.expected_output_len, r.prompt)
        for r in workload
    ]
    extra = [
        {f"guided_{r.kind}": r.constraint} if i in constrained else None
        for i, r in enumerate(workload)
    ]
    results, duration = serve.run_async(
        serve.benchmark(
            base,
            endpoint,
            model_id,
            requests,
            request_rate,
            burstiness,
            max_concurrency,
            ignore_eos,
            seed,
            disable_tqdm,
            extra_bodies=extra,
        )
    )
    picked = sorted(constrained)
    result = serve.result_header(
        backend, model_id, tokenizer_id, num_prompts, request_rate, burstiness, max_concurrency
    )
    result["correct_rate(%)"] = guided.correct_rate(
        [workload[i] for i in picked], [results[i].generated_text for i in picked]
    )
    result |= serve_metrics.compute_metrics(results, duration, tok, metrics, ps, slos)
    if save_results:
        outputs = [
            {"generated": r.generated_text, "constrained": i in constrained, "error": r.error}
            for i, r in enumerate(results)
        ]
        serve.write_result({"outputs": outputs, **result}, result_dir, result_filename)
    return result
