"""The "mp" backend: ranks 1..N-1 run in child processes on this machine, each a RankWorker that
repeats every call rank 0 makes (sent over a pipe).

Children are started as `python -m labkit.engine.tp_worker`, not with multiprocessing's spawn:
spawn re-runs the user's main script in the child, which breaks scripts without an
`if __name__ == "__main__":` guard (vLLM's quickstart script has none), and fork is unsafe once
torch's thread pools exist.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import subprocess
import sys
import time

from labkit.engine.executor.base import STARTUP_TIMEOUT_S, WorkerGroup
from labkit.engine.model_runner import RankPlacement
from labkit.engine.resolved_config import ResolvedConfig
from labkit.utils import free_port


class MpWorkerGroup(WorkerGroup):
    def __init__(self, config: ResolvedConfig):
        self.port = free_port(self.host)
        self.procs: list[subprocess.Popen] = []
        self.conns: list[mpc.Connection] = []
        for rank in range(1, config.tensor_parallel_size):
            parent, child = mpc.Pipe()
            proc = subprocess.Popen(
                [sys.executable, "-m", "labkit.engine.tp_worker", str(child.fileno())],
                pass_fds=[child.fileno()],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Its own session: a Ctrl-C meant for the engine's process (a server draining
                # its requests) must not kill the workers first; they exit when told or on EOF.
                start_new_session=True,
            )
            child.close()
            parent.send((config, RankPlacement(rank, self.host, self.port)))
            self.procs.append(proc)
            self.conns.append(parent)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"tensor-parallel worker {rank} died while starting "
                        f"(exit code {proc.returncode}); its error is above"
                    )
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
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
