"""distributed_executor_backend="ray" on the CPU: rank 1 is a Ray actor of a local Ray instance
that the first engine starts (shared by this module's tests and shut down at its end). It gives
the "mp" backend's tokens, runs the driver's labkit, leaves no actor, placement group or process
behind when the engine closes, and fails clearly when an actor cannot start or the cluster has
no room."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import QUICKSTART_PROMPTS, greedy_params, random_prompts

from labkit import LLM
from labkit.config import EngineConfig
from labkit.engine.resolved_config import resolve

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

RAY = dict(dtype="float32", tensor_parallel_size=2, distributed_executor_backend="ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray for this module's tests: started by its first engine (ray.init(), as for a user who
    never calls it; this machine's CPUs), shut down at the module's end."""
    was_up = ray.is_initialized()
    yield
    if not was_up:
        ray.shutdown()


def _tokens_and_logprobs(llm: LLM, prompts, max_tokens: int):
    outs = llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)
    return (
        [o.outputs[0].token_ids for o in outs],
        [
            [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
            for o in outs
        ],
    )


def _labkit_actors() -> list[str]:
    """The live actors of labkit engines (the backend names them), from Ray's GCS."""
    from labkit.engine.executor.ray_actors import ACTOR_NAMESPACE

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == ACTOR_NAMESPACE
    ]


def _live_placement_groups() -> list[str]:
    return [
        pg for pg, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"
    ]


def _rank_processes() -> list[int]:
    """This process's descendants that run a rank: Ray names an actor's process after its class
    (ray::RayRank), the mp backend's are `python -m labkit.engine.tp_worker`."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if p.status() != psutil.STATUS_ZOMBIE and ("RayRank" in cmd or "tp_worker" in cmd):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def test_ray_tp2_gives_the_tokens_of_mp(ray_cluster, tiny_ckpts):
    path = str(tiny_ckpts["llama"])
    with LLM(path, dtype="float32", tensor_parallel_size=2) as mp:
        prompts = QUICKSTART_PROMPTS + random_prompts(
            mp.config.model_config.vocab_size, [1, 9, 40, 150], seed=6
        )
        ref = _tokens_and_logprobs(mp, prompts, 10)
    started_by_us = not ray.is_initialized()
    with LLM(path, **RAY) as llm:
        assert type(llm.engine.workers).__name__ == "RayWorkerGroup"
        assert ray.is_initialized()
        # Same ranks, same collectives (gloo), same order of sums: the very same numbers.
        assert _tokens_and_logprobs(llm, prompts, 10) == ref
        # The actor runs the labkit this process imported (the backend puts its root first on
        # the actor's PYTHONPATH), with the rank's share of the cores.
        actor = llm.engine.workers._ranks[0]
        theirs = ray.get(
            actor.__ray_call__.remote(
                lambda self: (
                    __import__("labkit").__file__,
                    self.runner.rank,
                    self.runner.placement.host,
                )
            )
        )
        import labkit

        assert theirs == (labkit.__file__, 1, llm.engine.workers.host)
        from labkit.engine.executor.ray_actors import actor_env

        root = str(Path(labkit.__file__).resolve().parents[1])
        assert actor_env()["PYTHONPATH"].split(os.pathsep)[0] == root
    # Ray stays up for the next engine, when the engine started it too.
    assert ray.is_initialized() or not started_by_us


def test_five_engines_in_a_row_leave_no_actor_group_or_process(ray_cluster, tiny_ckpts):
    path = str(tiny_ckpts["llama"])
    for i in range(5):
        llm = LLM(path, **RAY)
        assert len(_labkit_actors()) == 1 and len(_live_placement_groups()) == 1
        out = llm.generate([[1, 2, 3]], greedy_params(3), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
        if i % 2:
            llm.shutdown()
        else:
            llm.engine.shutdown()
            llm.engine.shutdown()  # twice: a no-op
        assert _labkit_actors() == [] and _live_placement_groups() == []
    # ray.kill ends the actor's process; give the raylet a moment to reap it.
    deadline = time.monotonic() + 20
    while _rank_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _rank_processes() == []
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]


def _resolved(tiny_ckpts, **overrides):
    return resolve(EngineConfig(model=str(tiny_ckpts["llama"]), **{**RAY, **overrides}))


def test_an_actor_that_fails_to_start_is_a_clear_error(ray_cluster, tiny_ckpts):
    from labkit.engine.executor.ray_actors import RayWorkerGroup

    # Not a device the ranks can use: rank 1's ModelRunner raises as it starts.
    config = dataclasses.replace(_resolved(tiny_ckpts), device="meta")
    group = RayWorkerGroup(config)
    try:
        with pytest.raises(RuntimeError, match="worker 1 \\(a Ray actor\\) failed to start"):
            group.wait_ready()
    finally:
        group.shutdown()
    assert _labkit_actors() == [] and _live_placement_groups() == []


def test_more_ranks_than_the_cluster_holds_is_a_clear_error(ray_cluster, tiny_ckpts):
    from labkit.engine.executor.ray_actors import RayWorkerGroup

    cpus = int(ray.cluster_resources()["CPU"])
    config = _resolved(tiny_ckpts)
    config = dataclasses.replace(
        config, options=dataclasses.replace(config.options, tensor_parallel_size=cpus + 1)
    )
    with pytest.raises(
        RuntimeError,
        match=f"cannot place {cpus + 1} tensor-parallel ranks: they "
        f"need {cpus + 1} 'CPU' and the cluster has {cpus}",
    ):
        RayWorkerGroup(config)
    assert _labkit_actors() == [] and _live_placement_groups() == []


def test_labkit_and_the_mp_backend_never_import_ray(tiny_ckpts):
    code = (
        "import sys; from labkit import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_ckpts['llama'])!r}, tensor_parallel_size=2)\n"
        "llm.generate(['Hello'], SamplingParams(max_tokens=2), use_tqdm=False)\n"
        "llm.shutdown()\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
