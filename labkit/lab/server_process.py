"""`labkit serve` as a child process for the lab's serving sweeps: started on a free loopback
port, waited for (/health), stopped with SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from labkit.utils import free_port


@dataclass
class ServerProcess:
    """`labkit serve [model] [args]` as a child process on a free loopback port; a context
    manager that waits for /health and stops it (SIGTERM) at the end."""

    model: str | None = None
    args: tuple[str, ...] = ()
    startup_timeout_s: float = 300
    proc: subprocess.Popen | None = None
    port: int = 0
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp()) / "server.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "labkit.cli",
            "serve",
            *([self.model] if self.model else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-log-requests",
            *self.args,
        ]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"labkit serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"labkit serve: no /health after {self.startup_timeout_s} s:\n"
                    f"{self.log()[-3000:]}"
                )
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc is not None else None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
