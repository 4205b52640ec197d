"""The interface between the engine and its tensor-parallel ranks 1..N-1, and the one piece of
rank logic both backends run: RankWorker holds a rank's ModelRunner and repeats each call rank 0
makes, so the collectives inside the forward pass line up."""

from __future__ import annotations

from abc import ABC, abstractmethod

from labkit.engine.model_runner import ModelRunner, RankPlacement
from labkit.engine.resolved_config import ResolvedConfig

STARTUP_TIMEOUT_S = 600


class WorkerGroup(ABC):
    """Ranks 1..N-1 of one engine. `port` (and `host`) is where the TP group meets: rank 0 (the
    engine's own ModelRunner) serves the rendezvous there."""

    host: str = "127.0.0.1"
    port: int

    def rank0_placement(self) -> RankPlacement:
        """Where rank 0, in the engine's process, runs and serves the rendezvous."""
        return RankPlacement(0, self.host, self.port)

    @abstractmethod
    def wait_ready(self) -> None:
        """Block until every rank has built its ModelRunner; a RuntimeError naming the rank
        if one failed."""

    @abstractmethod
    def call(self, method: str, *args) -> None:
        """Have every rank call `method(*args)` on its ModelRunner, in the order of the calls;
        does not wait for them (the collectives inside the call synchronise the ranks)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Close every rank's runner and end the ranks; safe to call twice."""


class RankWorker:
    """One rank's ModelRunner, built by `start` and driven by `call`: the body of a worker
    process (tp_worker) and of a Ray actor alike."""

    def __init__(self) -> None:
        self.runner: ModelRunner | None = None

    def start(self, config: ResolvedConfig, placement: RankPlacement) -> None:
        self.runner = ModelRunner(config, placement)

    def call(self, method: str, args: tuple) -> None:
        getattr(self.runner, method)(*args)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
