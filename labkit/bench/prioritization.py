"""Offline throughput under priority scheduling (vLLM's benchmark_prioritization.py).

The throughput workload, each request given priority 0 (60%) or 1 (40%) at random (lower runs
first), the engine built with scheduling_policy="priority" (--scheduling-policy defaults to
it here). Same JSON as throughput."""

from __future__ import annotations

import argparse

import numpy as np

from labkit.bench import common, throughput

HIGH_PRIORITY_SHARE = 0.6  # vLLM's split between priority 0 and 1


def add_args(p: argparse.ArgumentParser) -> None:
    throughput.add_workload_args(p, num_prompts=200)
    common.add_offline_args(p)
    p.set_defaults(scheduling_policy="priority")


def run(
    *,
    dataset_name: str = "random",
    dataset_path: str | None = None,
    input_len: int | None = None,
    output_len: int | None = None,
    n: int = 1,
    num_prompts: int = 200,
    random_range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
    profile: bool = False,
    profile_dir: str | None = None,
    output_json: str | None = None,
    save_step_log: bool = False,
    disable_tqdm: bool = False,
    llm=None,
    **engine_kwargs,
) -> dict:
    """Throughput's result dict. An engine built here runs the priority scheduler unless
    engine_kwargs say otherwise; a caller's `llm=` keeps its own policy (build it with
    scheduling_policy="priority" for the priorities to matter)."""
    if llm is None:
        engine_kwargs.setdefault("scheduling_policy", "priority")
    with common.engine(llm, seed, engine_kwargs) as llm:
        requests = common.load_workload(
            llm,
            dataset_name,
            num_prompts=num_prompts,
            input_len=input_len,
            output_len=output_len,
            range_ratio=random_range_ratio,
            prefix_len=prefix_len,
            dataset_path=dataset_path,
            seed=seed,
        )
        priority = random_priorities(len(requests), seed)
        return throughput.measure(
            llm,
            "prioritization",
            requests,
            n,
            priority=priority,
            profile=profile,
            profile_dir=profile_dir,
            output_json=output_json,
            save_step_log=save_step_log,
            disable_tqdm=disable_tqdm,
        )


def random_priorities(num_requests: int, seed: int) -> list[int]:
    draws = np.random.default_rng(seed).random(num_requests)
    return [0 if d < HIGH_PRIORITY_SHARE else 1 for d in draws]
