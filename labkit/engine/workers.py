"""Tensor-parallel worker processes. Rank 0's ModelRunner lives in the engine's process; ranks
1..N-1 run in spawned processes, each with its own ModelRunner, and repeat every call that rank 0
makes (sent over a pipe), so the collectives inside the forward pass line up."""
from __future__ import annotations

import multiprocessing as mp
import socket
import traceback

from labkit.config import EngineConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(config: EngineConfig, rank: int, init_method: str, conn) -> None:
    from labkit.engine.model_runner import ModelRunner
    try:
        runner = ModelRunner(config, rank, init_method)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    try:
        while True:
            method, args = conn.recv()
            if method == "exit":
                break
            getattr(runner, method)(*args)
    except (EOFError, KeyboardInterrupt):
        pass  # the engine went away: exit quietly
    finally:
        runner.close()


class WorkerGroup:
    def __init__(self, config: EngineConfig):
        n = config.tensor_parallel_size
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(1, n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(config, rank, self.init_method, child),
                            daemon=True, name=f"labkit-tp{rank}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)

    def wait_ready(self) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            status, detail = conn.recv()
            if status != "ready":
                raise RuntimeError(f"tensor-parallel worker {rank} failed to start:\n{detail}")

    def call(self, method: str, *args) -> None:
        for conn in self.conns:
            conn.send((method, args))

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
