"""Entry point of a tensor-parallel worker process of the "mp" backend (rank >= 1): a RankWorker
fed over the pipe whose descriptor is the first argument; see executor/mp.py."""

from __future__ import annotations

import multiprocessing.connection as mpc
import sys
import traceback

from labkit.engine.executor.base import RankWorker


def _worker_main(fd: int) -> None:
    conn = mpc.Connection(fd)
    config, placement = conn.recv()
    worker = RankWorker()
    try:
        worker.start(config, placement)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    try:
        while True:
            method, args = conn.recv()
            if method == "exit":
                break
            worker.call(method, args)
    except (EOFError, KeyboardInterrupt):
        pass  # the engine went away: exit quietly
    finally:
        worker.close()


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]))
