"""The `labkit` command line, run as users run it: a separate process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _labkit() -> list[str]:
    # The console script installed next to this interpreter, so that the test runs this
    # environment's labkit even when PATH points elsewhere.
    exe = Path(sys.executable).with_name("labkit")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("labkit")
    assert found, "the `labkit` console script is not installed (pip install -e .)"
    return [found]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _labkit() + list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow
def test_generate_prints_a_completion_that_knows_paris():
    r = _run("generate", "The capital of France is")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith("Prompt: 'The capital of France is', Generated text: ")
    assert "Paris" in lines[0].split("Generated text: ", 1)[1]


@pytest.mark.slow
def test_generate_chat_prints_the_users_prompt_not_the_template():
    r = _run("generate", "--chat", "What is the capital of France?", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("Prompt: ")]
    assert lines == [
        f"Prompt: 'What is the capital of France?', Generated text: "
        f"{lines[0].split('Generated text: ', 1)[1]}"
    ]
    assert "Paris" in lines[0] and "<|im_start|>" not in r.stdout


def test_generate_reports_a_bad_model_path_without_a_traceback(tmp_path):
    r = _run("generate", "hi", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "labkit: error: model:" in r.stderr
    assert "Traceback" not in r.stderr


def test_async_scheduling_flags_reach_the_engine_config():
    from labkit.cli import build_parser, engine_kwargs
    from labkit.config import EngineConfig
    from labkit.engine.resolved_config import resolve

    for flag, want in (
        ([], False),
        (["--async-scheduling"], True),
        (["--no-async-scheduling"], False),
    ):
        kw = engine_kwargs(build_parser().parse_args(["generate", *flag, "x"]))
        # Unset, the config picks vLLM's default for the device: on for CUDA, off for the CPU.
        assert kw["async_scheduling"] == (want if flag else None)
        assert resolve(EngineConfig.from_kwargs(**{**kw, "device": "cpu"})).async_scheduling is want
