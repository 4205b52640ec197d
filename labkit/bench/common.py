"""What the offline benchmarks share: their common flags, the engine they run on, the timed
region (wall time, a torch.profiler trace, the engine steps it ran), the result files, the
throughput and percentile arithmetic, and the serving clients' tokenizer (load_tokenizer)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from labkit.bench import datasets
from labkit.config import add_engine_args
from labkit.observe.trace import DEFAULT_PROFILE_DIR, trace_region

log = logging.getLogger("labkit.bench")


# ---- flags ----------------------------------------------------------------------------------
def add_offline_args(p: argparse.ArgumentParser) -> None:
    """Engine flags and the output, profiling and progress flags every offline benchmark takes."""
    add_engine_args(p)
    p.add_argument(
        "--output-json",
        default=None,
        dest="output_json",
        help="write the result here (and the timed region's engine steps to <stem>.steps.csv)",
    )
    p.add_argument(
        "--save-step-log",
        action="store_true",
        dest="save_step_log",
        help="write the timed region's engine steps as CSV even without --output-json",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler trace of the timed region (Chrome/Perfetto JSON, gzip) and an "
        "operator table",
    )
    p.add_argument(
        "--profile-dir",
        default=None,
        dest="profile_dir",
        help=f"where --profile writes (default ./{DEFAULT_PROFILE_DIR})",
    )
    p.add_argument("--disable-tqdm", action="store_true", dest="disable_tqdm")


# ---- the engine -----------------------------------------------------------------------------
@contextlib.contextmanager
def engine(llm, seed: int, engine_kwargs: dict) -> Iterator:
    """The LLM a benchmark runs on: the caller's (left open for the next benchmark) or one built
    from `engine_kwargs` and `seed` (also the workload's seed, as in vLLM) and closed at the end."""
    if llm is not None:
        if engine_kwargs:
            raise ValueError(
                f"engine arguments ({', '.join(sorted(engine_kwargs))}) given together "
                "with llm=: they only apply when the benchmark builds its own engine"
            )
        yield llm
        return
    from labkit import LLM

    with LLM(**engine_kwargs, seed=seed) as built:
        yield built


def token_space(llm):
    return datasets.token_space(llm.config.model_config.vocab_size, llm.get_tokenizer())


def load_workload(llm, dataset_name: str, **kwargs) -> list[datasets.SampleRequest]:
    return datasets.load(
        dataset_name,
        vocab_size=llm.config.model_config.vocab_size,
        tokenizer=llm.get_tokenizer(),
        **kwargs,
    )


# ---- the timed region -----------------------------------------------------------------------
def num_steps(llm) -> int:
    """The number the engine's next step gets: where a timed region starts in the step log."""
    return llm.engine.stats().num_steps


def generate_benchmark(
    llm,
    name: str,
    prompts: list,
    params,
    *,
    priority: list[int] | None = None,
    count_cached_tokens: bool = False,
    profile: bool = False,
    profile_dir: str | None = None,
    output_json: str | None = None,
    save_step_log: bool = False,
    disable_tqdm: bool = False,
) -> dict:
    """vLLM's timed region for the throughput-style benchmarks, one `llm.generate` call (profiled
    with `profile`), its generated_result (plus "num_cached_tokens", the prompt tokens served
    from the prefix cache, with count_cached_tokens) and its files."""
    first_step = num_steps(llm)
    with trace_region(name, profile, profile_dir):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=not disable_tqdm, priority=priority)
        elapsed = time.perf_counter() - start
    result = generated_result(elapsed, outputs)
    if count_cached_tokens:
        result["num_cached_tokens"] = sum(o.num_cached_tokens for o in outputs)
    return write_outputs(
        name,
        result,
        output_json=output_json,
        save_step_log=save_step_log,
        llm=llm,
        first_step=first_step,
    )


# ---- results --------------------------------------------------------------------------------
def throughput_result(
    elapsed: float, num_requests: int, prompt_tokens: int, output_tokens: int
) -> dict:
    """vLLM's throughput JSON (total = prompt + output tokens) plus the output-only figures."""
    total = prompt_tokens + output_tokens
    return {
        "elapsed_time": elapsed,
        "num_requests": num_requests,
        "total_num_tokens": total,
        "requests_per_second": num_requests / elapsed,
        "tokens_per_second": total / elapsed,
        "total_output_tokens": output_tokens,
        "output_tokens_per_second": output_tokens / elapsed,
    }


def generated_result(elapsed: float, outputs: list) -> dict:
    """throughput_result from what the engine actually did: every prompt token, every generated
    token of every one of the n sequences."""
    return throughput_result(
        elapsed,
        len(outputs),
        sum(len(o.prompt_token_ids) for o in outputs),
        sum(len(c.token_ids) for o in outputs for c in o.outputs),
    )


def percentile_label(p: float) -> str:
    """vLLM's spelling of a percentile in result keys: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if int(p) == p else str(p)


def percentiles(values: list[float], ps) -> dict[str, float]:
    return {percentile_label(p): float(np.percentile(values, p)) for p in ps}


def write_outputs(
    name: str,
    result: dict,
    *,
    output_json: str | None,
    save_step_log: bool,
    llm=None,
    first_step: int = 0,
) -> dict:
    """Write the result JSON and, from an engine, the steps of the timed region as
    <json stem>.steps.csv (./<name>.steps.csv without a JSON path). Returns the result."""
    if output_json:
        path = Path(output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=4) + "\n")
    if llm is not None and (output_json or save_step_log):
        steps = (
            Path(output_json).with_suffix(".steps.csv")
            if output_json
            else Path(f"{name}.steps.csv")
        )
        log_df = llm.step_log()
        log_df[log_df["step"] >= first_step].to_csv(steps, index=False)
        log.info("step log of the timed region: %s", steps)
    return result


def load_tokenizer(tokenizer: str | None, model: str | None):
    """The tokenizer that builds the prompts and counts generated tokens, and its id for the
    result: --tokenizer (a path or Hub repo id), else --model when that is a local path or a
    Hub repo id (cached or downloadable), else the default model's."""
    from transformers import AutoTokenizer

    from labkit.models import hub
    from labkit.models.loader import resolve_model_dir

    source = tokenizer or model
    if source is not None and hub.is_hub_name(source):
        try:
            path = hub.snapshot(
                source,
                revision=None,
                download_dir=None,
                allow_patterns=hub.patterns("auto", tokenizer_only=True),
                what="tokenizer",
            )
            return AutoTokenizer.from_pretrained(str(path)), source
        except ValueError:
            if tokenizer is not None:
                raise
            source = None  # a served name that is no repo: fall back to the default model
    if source is None:
        from labkit.default_model import DEFAULT_MODEL_NAME, default_model_path

        path = resolve_model_dir(str(default_model_path()))
        return AutoTokenizer.from_pretrained(str(path)), DEFAULT_MODEL_NAME
    path = Path(source).expanduser()
    has_tokenizer = path.is_dir() and any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")
    )
    # A .gguf file (or a directory of one) holds its tokenizer inside: use labkit's conversion.
    tokenizer_dir = path if has_tokenizer else resolve_model_dir(source)
    return AutoTokenizer.from_pretrained(str(tokenizer_dir)), source
