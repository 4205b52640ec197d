"""Entry point of a tensor-parallel worker process (rank >= 1); see workers.py."""
from __future__ import annotations

import multiprocessing.connection as mpc
import sys
import traceback


def _worker_main(fd: int) -> None:
    conn = mpc.Connection(fd)
    config, rank, port = conn.recv()
    from labkit.engine.model_runner import ModelRunner
    try:
        runner = ModelRunner(config, rank, port)
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


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]))
