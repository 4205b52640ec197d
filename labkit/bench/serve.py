"""Serving benchmark against an OpenAI-compatible server (vLLM's benchmark_serving.py).

A streaming client for any /v1/completions server, labkit's or another. Requests arrive as a
Poisson process (gamma with `burstiness` != 1; all at once with an infinite rate), at most
`max_concurrency` in flight if given, and each is timed chunk by chunk:

  TTFT  time from sending the request to the first streamed chunk that carries a choice
  ITL   the gaps between successive such chunks
  E2EL  time from sending the request to its last such chunk
  TPOT  (E2EL - TTFT) / (output tokens - 1), per request with more than one output token

Output tokens are the server's usage.completion_tokens (asked for with
stream_options.include_usage), else the tokenizer's count of the generated text. Prompts are
sent as token ids, so the server sees exactly the lengths the dataset drew. A request that fails
(server down, HTTP error, broken stream) counts in "failed", never aborts the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from labkit.bench import common, datasets
from labkit.bench.serve_metrics import (
    METRICS,
    RequestResult,
    compute_metrics,
    details,
    parse_options,
)

log = logging.getLogger("labkit.bench")

BACKENDS = ("openai", "vllm", "labkit")  # all speak OpenAI's streaming completions


def add_args(p: argparse.ArgumentParser) -> None:
    """A client: no engine flags, vLLM's serving flags."""
    add_client_args(p)
    p.add_argument(
        "--dataset-name", choices=datasets.DATASET_NAMES, default="random", dest="dataset_name"
    )
    p.add_argument("--dataset-path", default=None, dest="dataset_path")
    p.add_argument("--num-prompts", type=int, default=1000, dest="num_prompts")
    p.add_argument("--sharegpt-output-len", type=int, default=None, dest="sharegpt_output_len")
    p.add_argument("--random-input-len", type=int, default=1024, dest="random_input_len")
    p.add_argument("--random-output-len", type=int, default=128, dest="random_output_len")
    p.add_argument("--random-range-ratio", type=float, default=0.0, dest="random_range_ratio")
    p.add_argument("--random-prefix-len", type=int, default=0, dest="random_prefix_len")
    p.add_argument("--save-result", action="store_true", dest="save_result")
    p.add_argument(
        "--save-detailed",
        action="store_true",
        dest="detailed",
        help="also each request's input and output length, TTFT, ITLs, E2EL and error",
    )


def add_client_args(p: argparse.ArgumentParser) -> None:
    """The flags of any serving client (this one and serve_guided): where the server is, the
    arrival process, the metrics and where the result goes."""
    p.add_argument("--backend", choices=BACKENDS, default="openai")
    p.add_argument(
        "--base-url",
        default=None,
        dest="base_url",
        help="e.g. http://127.0.0.1:8000 (overrides --host/--port)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument(
        "--model",
        default=None,
        help="model name to request (default: the server's first /v1/models entry)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="local checkpoint or tokenizer dir (default: the model's, if it is a local "
        "path; else the default model's)",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        dest="request_rate",
        help="requests per second (inf: all at once)",
    )
    p.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps; 1 = Poisson"
    )
    p.add_argument("--max-concurrency", type=int, default=None, dest="max_concurrency")
    p.add_argument("--ignore-eos", action="store_true", dest="ignore_eos")
    p.add_argument(
        "--percentile-metrics",
        default="ttft,tpot,itl",
        dest="percentile_metrics",
        help=f"comma-separated, of {','.join(METRICS)}",
    )
    p.add_argument(
        "--metric-percentiles",
        default="99",
        dest="metric_percentiles",
        help="comma-separated, e.g. 25,50,99",
    )
    p.add_argument("--goodput", nargs="+", default=None, help="SLOs in ms, e.g. ttft:500 tpot:50")
    p.add_argument("--result-dir", default=None, dest="result_dir")
    p.add_argument("--result-filename", default=None, dest="result_filename")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable-tqdm", action="store_true", dest="disable_tqdm")


def run(
    *,
    backend: str = "openai",
    base_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    endpoint: str = "/v1/completions",
    model: str | None = None,
    tokenizer: str | None = None,
    dataset_name: str = "random",
    dataset_path: str | None = None,
    num_prompts: int = 1000,
    sharegpt_output_len: int | None = None,
    random_input_len: int = 1024,
    random_output_len: int = 128,
    random_range_ratio: float = 0.0,
    random_prefix_len: int = 0,
    request_rate: float = float("inf"),
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
    percentile_metrics: str = "ttft,tpot,itl",
    metric_percentiles: str = "99",
    goodput: list[str] | None = None,
    save_result: bool = False,
    result_dir: str | None = None,
    result_filename: str | None = None,
    seed: int = 0,
    disable_tqdm: bool = False,
    detailed: bool = False,
) -> dict:
    """vLLM's serving result dict (see the module docstring). Safe to call from a notebook: with
    an event loop already running, the benchmark runs on a thread of its own. `detailed`: as
    vLLM's --save-detailed, per request (in the dataset's order) "input_lens", "output_lens",
    "ttfts", "itls", "e2els" (seconds; 0 / [] for a failed request) and "errors" ("" if none)."""
    metrics, ps, slos = parse_options(
        percentile_metrics, metric_percentiles, goodput, request_rate, burstiness
    )
    base = (base_url or f"http://{host}:{port}").rstrip("/")
    # Asked first: a labkit server names its model by its path, which then gives the tokenizer.
    model_id = model or run_async(served_model(base))
    tok, tokenizer_id = common.load_tokenizer(tokenizer, model_id)
    random_set = dataset_name == "random"
    requests = datasets.load(
        dataset_name,
        vocab_size=len(tok),
        tokenizer=tok,
        num_prompts=num_prompts,
        input_len=random_input_len,
        output_len=random_output_len if random_set else sharegpt_output_len,
        range_ratio=random_range_ratio,
        prefix_len=random_prefix_len,
        dataset_path=dataset_path,
        seed=seed,
    )
    results, duration = run_async(
        benchmark(
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
        )
    )
    result = result_header(
        backend, model_id, tokenizer_id, num_prompts, request_rate, burstiness, max_concurrency
    )
    result |= compute_metrics(results, duration, tok, metrics, ps, slos)
    if detailed:
        result |= details(results, tok)
    if save_result:
        write_result(result, result_dir, result_filename)
    return result


def result_header(
    backend: str,
    model_id: str | None,
    tokenizer_id: str,
    num_prompts: int,
    request_rate: float,
    burstiness: float,
    max_concurrency: int | None,
) -> dict:
    """The keys of a serving result that describe the run."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": backend,
        "model_id": model_id,
        "tokenizer_id": tokenizer_id,
        "num_prompts": num_prompts,
        "request_rate": request_rate if request_rate < float("inf") else "inf",
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
    }


# ---- the client -----------------------------------------------------------------------------
async def benchmark(
    base: str,
    endpoint: str,
    model: str | None,
    requests: list[datasets.SampleRequest],
    request_rate: float,
    burstiness: float,
    max_concurrency: int | None,
    ignore_eos: bool,
    seed: int,
    disable_tqdm: bool,
    extra_bodies: list[dict | None] | None = None,
):
    """Send `requests` as the module docstring says; `extra_bodies[i]`, if given, adds its
    fields to request i's body (serve_guided's constraints). Returns (results, duration)."""
    import aiohttp

    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), desc="Requests", disable=disable_tqdm)
    # vLLM's client settings: generous timeout, and room for long SSE lines.
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=6 * 3600),
        read_bufsize=10 * 2**20,
        headers=_auth_headers(),
    ) as session:

        async def one(req: datasets.SampleRequest, extra: dict | None) -> RequestResult:
            payload = {
                "prompt": req.prompt_token_ids,
                "temperature": 0.0,
                "max_tokens": req.expected_output_len,
                "stream": True,
                "stream_options": {"include_usage": True},
                **(extra or {}),
            }
            if model is not None:
                payload["model"] = model
            if ignore_eos:
                payload["ignore_eos"] = True
            async with limit:
                res = await _request(session, base + endpoint, payload, req.prompt_len)
            bar.update(1)
            return res

        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            if i and request_rate != float("inf"):
                # Gamma gaps with mean 1/rate; shape 1 is the exponential gap of a Poisson process.
                await asyncio.sleep(rng.gamma(burstiness, 1.0 / (request_rate * burstiness)))
            tasks.append(asyncio.create_task(one(req, extra_bodies[i] if extra_bodies else None)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def served_model(base: str) -> str | None:
    """The server's first model (None when it can't be asked: the requests will say why)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), headers=_auth_headers()
        ) as session:
            async with session.get(base + "/v1/models") as resp:
                return (await resp.json())["data"][0]["id"]
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, LookupError, TypeError):
        return None


def _auth_headers() -> dict:
    """OpenAI's convention, as vLLM's client: the key in $OPENAI_API_KEY, if set."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _request(session, url: str, payload: dict, prompt_len: int) -> RequestResult:
    """One streamed completion, timed as vLLM's async_request_openai_completions does."""
    out = RequestResult(prompt_len)
    start = last = time.perf_counter()
    got_chunk = False
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return out
            async for line in resp.content:
                line = line.strip()
                if not line:
                    continue
                data = line.decode("utf-8").removeprefix("data: ")
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if choices := chunk.get("choices"):
                    now = time.perf_counter()
                    if not got_chunk:
                        got_chunk, out.ttft = True, now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                    out.generated_text += choices[0].get("text") or ""  # empty for a special token
                elif usage := chunk.get("usage"):
                    out.output_tokens = usage.get("completion_tokens")
        out.success = got_chunk
        out.error = "" if out.success else "the stream ended without a completion chunk"
        out.latency = last - start
    except Exception as e:  # any failure of one request is that request's failure, not the run's
        out.error = f"{type(e).__name__}: {e}"
    return out


def run_async(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:  # inside Jupyter's loop: run ours on another thread
        return pool.submit(asyncio.run, coro).result()


# ---- metrics --------------------------------------------------------------------------------


# ---- files ----------------------------------------------------------------------------------


def write_result(result: dict, result_dir: str | None, result_filename: str | None) -> Path:
    concurrency = (
        f"-concurrency{result['max_concurrency']}" if result["max_concurrency"] is not None else ""
    )
    model = str(result["model_id"] or "unknown").split("/")[-1]
    name = (
        result_filename
        or f"{result['backend']}-{result['request_rate']}qps{concurrency}-{model}-"
        f"{result['date']}.json"
    )
    path = Path(result_dir or ".") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=4) + "\n")
    log.info("serving result: %s", path)
    return path
