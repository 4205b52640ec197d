"""Helpers for the server tests: start a real `labkit serve` process on a free loopback port,
and talk raw HTTP to it (http.client, so tests control every byte and header)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from labkit.utils import free_port

STARTUP_TIMEOUT_S = 120


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        body: dict | bytes | None = None,
        headers: dict | None = None,
        auth: bool = True,
    ) -> tuple[int, dict | str]:
        """One request; returns (status, parsed JSON body or text)."""
        hdrs = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if auth and self.api_key:
            hdrs.setdefault("Authorization", f"Bearer {self.api_key}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read().decode()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except json.JSONDecodeError:
            return resp.status, raw

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample name with labels minus model_name: value}."""
        status, text = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[re.sub(r',?model_name="[^"]*"', "", name).replace("{}", "")] = float(value)
        return out

    def wait_idle(self, timeout: float = 20) -> dict[str, float]:
        """Metrics once nothing runs, waits or holds KV blocks (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (
                m["labkit:num_requests_running"],
                m["labkit:num_requests_waiting"],
                m["labkit:kv_cache_usage_perc"],
            ) == (0, 0, 0):
                return m
            assert time.monotonic() < deadline, f"server not idle: {m}"
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    log_dir: Path,
    model: str | None,
    *args: str,
    api_key: str | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """`labkit serve [model] args...` on a free port; returns once /health answers 200."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "labkit.cli",
        "serve",
        *([model] if model else []),
        "--port",
        str(port),
        *args,
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    server = Server(proc, port, log_path, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()}")
        time.sleep(0.2)


def sse_events(raw: bytes) -> list[dict | str]:
    """The data of each SSE event in a raw (possibly chunked) HTTP body: parsed JSON, or the
    string "[DONE]"."""
    return [
        d.decode() if d == b"[DONE]" else json.loads(d)
        for d in re.findall(rb"data: (.*?)\n\n", raw)
    ]
