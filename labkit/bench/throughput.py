"""Offline throughput (vLLM's benchmark_throughput.py), labkit or transformers.

All `num_prompts` requests are handed to the engine at once; the timed region is one
`llm.generate` call. Sampling as vLLM's: temperature 1, top-p 1, EOS ignored, so each request
makes exactly its expected output length.

`backend="hf"` runs the same prompts (same token ids) through transformers' `generate` in
left-padded batches of `hf_max_batch_size` (default: the engine's max_num_seqs, so both backends
hold at most as many sequences at once), for side-by-side figures."""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from labkit.bench import common, datasets
from labkit.observe.trace import trace_region

BACKENDS = ("labkit", "hf")


def add_workload_args(p: argparse.ArgumentParser, num_prompts: int) -> None:
    """The dataset flags throughput and prioritization share."""
    p.add_argument(
        "--dataset-name", choices=datasets.DATASET_NAMES, default="random", dest="dataset_name"
    )
    p.add_argument(
        "--dataset-path",
        "--dataset",
        default=None,
        dest="dataset_path",
        help="a ShareGPT JSON file, for --dataset-name sharegpt",
    )
    p.add_argument(
        "--input-len",
        type=int,
        default=None,
        dest="input_len",
        help="prompt tokens per request (random dataset; required there)",
    )
    p.add_argument(
        "--output-len",
        type=int,
        default=None,
        dest="output_len",
        help="output tokens per request (required for random; overrides ShareGPT's)",
    )
    p.add_argument("--n", type=int, default=1, help="sequences per prompt")
    p.add_argument("--num-prompts", type=int, default=num_prompts, dest="num_prompts")
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        dest="random_range_ratio",
        help="random lengths drawn in [L(1-r), L(1+r)]",
    )
    p.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        dest="prefix_len",
        help="random tokens shared by every random prompt, before its own input-len",
    )


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="labkit")
    add_workload_args(p, num_prompts=1000)
    p.add_argument(
        "--hf-max-batch-size",
        type=int,
        default=None,
        dest="hf_max_batch_size",
        help="prompts per transformers generate() call (default: --max-num-seqs)",
    )
    common.add_offline_args(p)


def run(
    *,
    backend: str = "labkit",
    dataset_name: str = "random",
    dataset_path: str | None = None,
    input_len: int | None = None,
    output_len: int | None = None,
    n: int = 1,
    num_prompts: int = 1000,
    random_range_ratio: float = 0.0,
    prefix_len: int = 0,
    hf_max_batch_size: int | None = None,
    seed: int = 0,
    profile: bool = False,
    profile_dir: str | None = None,
    output_json: str | None = None,
    save_step_log: bool = False,
    disable_tqdm: bool = False,
    llm=None,
    **engine_kwargs,
) -> dict:
    """{"elapsed_time", "num_requests", "total_num_tokens", "requests_per_second",
    "tokens_per_second", "total_output_tokens", "output_tokens_per_second"}. Pass `llm=` to
    reuse a loaded engine (labkit backend); otherwise engine_kwargs build one."""
    workload = dict(
        dataset_name=dataset_name,
        num_prompts=num_prompts,
        input_len=input_len,
        output_len=output_len,
        range_ratio=random_range_ratio,
        prefix_len=prefix_len,
        dataset_path=dataset_path,
        seed=seed,
    )
    if backend == "hf":
        if llm is not None:
            raise ValueError("llm= is a labkit engine: it cannot run backend='hf'")
        result = _run_hf(
            workload, n, hf_max_batch_size, seed, engine_kwargs, profile, profile_dir, disable_tqdm
        )
        return common.write_outputs(
            "throughput", result, output_json=output_json, save_step_log=False
        )
    if backend != "labkit":
        raise ValueError(f"backend={backend!r} is invalid: must be one of {', '.join(BACKENDS)}")
    with common.engine(llm, seed, engine_kwargs) as llm:
        requests = common.load_workload(llm, **workload)
        return measure(
            llm,
            "throughput",
            requests,
            n,
            profile=profile,
            profile_dir=profile_dir,
            output_json=output_json,
            save_step_log=save_step_log,
            disable_tqdm=disable_tqdm,
        )


def measure(
    llm,
    name: str,
    requests: list[datasets.SampleRequest],
    n: int,
    *,
    priority: list[int] | None = None,
    profile: bool,
    profile_dir: str | None,
    output_json: str | None,
    save_step_log: bool,
    disable_tqdm: bool,
) -> dict:
    """The labkit side: one timed generate over the whole workload, its result and files."""
    from labkit import SamplingParams

    params = [
        SamplingParams(
            n=n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=r.expected_output_len
        )
        for r in requests
    ]
    return common.generate_benchmark(
        llm,
        name,
        [r.engine_prompt() for r in requests],
        params,
        priority=priority,
        profile=profile,
        profile_dir=profile_dir,
        output_json=output_json,
        save_step_log=save_step_log,
        disable_tqdm=disable_tqdm,
    )


# ---- transformers ---------------------------------------------------------------------------
def _run_hf(
    workload: dict,
    n: int,
    max_batch_size: int | None,
    seed: int,
    engine_kwargs: dict,
    profile: bool,
    profile_dir: str | None,
    disable_tqdm: bool,
) -> dict:
    from transformers import AutoTokenizer

    from labkit import EngineConfig
    from labkit.engine.resolved_config import resolve

    # The engine's own resolution: the same checkpoint directory (a GGUF file's converted one),
    # dtype and device labkit would use.
    cfg = resolve(EngineConfig.from_kwargs(**engine_kwargs, seed=seed))
    if cfg.tensor_parallel_size != 1:
        raise ValueError("tensor_parallel_size: the hf backend runs in one process; use 1")
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer_dir))
    requests = datasets.load(
        vocab_size=cfg.model_config.vocab_size, tokenizer=tokenizer, **workload
    )
    model = _load_hf_model(cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = max_batch_size or cfg.max_num_seqs
    torch.manual_seed(seed)
    with trace_region("throughput-hf", profile, profile_dir):
        start = time.perf_counter()
        for i in tqdm(range(0, len(requests), batch), desc="hf batches", disable=disable_tqdm):
            _hf_generate(model, requests[i : i + batch], n, pad, cfg.device)
        elapsed = time.perf_counter() - start
    # Counted as the workload asks; each batch generates its longest request's length for every
    # row, so with a random range ratio transformers does somewhat more work than is counted.
    return common.throughput_result(
        elapsed,
        len(requests),
        sum(r.prompt_len for r in requests),
        n * sum(r.expected_output_len for r in requests),
    )


def _load_hf_model(cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.load_format == "dummy":
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(cfg.model_dir)))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(cfg.model_dir))
    return model.to(device=cfg.device, dtype=cfg.dtype).eval()


def _hf_generate(model, batch: list[datasets.SampleRequest], n: int, pad: int, device: str) -> None:
    width = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(batch):  # left padding: every row's last prompt token lines up
        ids[row, width - r.prompt_len :] = torch.tensor(r.prompt_token_ids)
        mask[row, width - r.prompt_len :] = 1
    new = max(r.expected_output_len for r in batch)
    with torch.inference_mode():
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            num_return_sequences=n,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=pad,
        )
