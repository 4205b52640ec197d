"""Where the tensor-parallel ranks 1..N-1 run (rank 0's ModelRunner always lives in the engine's
process), chosen by the `distributed_executor_backend` option:

  base        WorkerGroup, the interface the engine drives (wait_ready, call, shutdown, port),
              and RankWorker, one rank's ModelRunner behind `start` / `call` / `close`, shared
              by both backends
  mp          "mp": each rank a `python -m labkit.engine.tp_worker` child process, over a pipe
  ray_actors  "ray": each rank a Ray actor in a placement group (Ray is imported only here)

May import: the rest of labkit.engine below the engine core (model_runner, resolved_config), and
what they may import.
"""

from __future__ import annotations

from labkit.engine.executor.base import WorkerGroup
from labkit.engine.resolved_config import ResolvedConfig


def start_workers(config: ResolvedConfig) -> WorkerGroup | None:
    """Start ranks 1..N-1 of the engine (None for a single rank); they load their shards while
    the caller builds rank 0, then `wait_ready`."""
    if config.tensor_parallel_size == 1:
        return None
    if config.distributed_executor_backend == "ray":
        from labkit.engine.executor.ray_actors import RayWorkerGroup

        return RayWorkerGroup(config)
    from labkit.engine.executor.mp import MpWorkerGroup

    return MpWorkerGroup(config)
