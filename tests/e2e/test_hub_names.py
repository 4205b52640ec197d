"""Checkpoints by Hub name, with no network: a Hugging Face cache laid out on disk
(`models--org--name/snapshots/<rev>/`, `refs/main`) and HF_HUB_OFFLINE=1, through every entry
point that takes a model: LLM(), `labkit generate`, `labkit serve` and `labkit bench`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from server_support import start_server

from labkit import LLM, SamplingParams

REPO_ID = "org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_ckpts):
    cache = tmp_path_factory.mktemp("hf-hub-cache")
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(tiny_ckpts["llama"], repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def _env(cache) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def _greedy(llm: LLM) -> list[int]:
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return llm.generate(["The capital of France is"], sp, use_tqdm=False)[0].outputs[0].token_ids


def test_llm_takes_a_repo_id_from_the_cache(hub_cache, tiny_llms):
    with LLM(REPO_ID, download_dir=str(hub_cache), dtype="float32") as llm:
        assert llm.config.model_dir.name == REVISION
        assert _greedy(llm) == _greedy(tiny_llms("llama"))


def test_generate_cli_by_name_offline(hub_cache):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "labkit.cli",
            "generate",
            "--model",
            REPO_ID,
            "--max-tokens",
            "4",
            "Hello",
        ],
        env=_env(hub_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Generated text:" in out.stdout


def test_a_name_not_in_the_cache_offline_is_one_clear_error(hub_cache):
    out = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "generate", "--model", "org/not-downloaded", "Hello"],
        env=_env(hub_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "org/not-downloaded" in out.stderr and "HF_HUB_OFFLINE" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_by_name_and_request_by_that_name(hub_cache, tmp_path):
    server = start_server(
        tmp_path,
        REPO_ID,
        "--max-model-len",
        "256",
        "--uvicorn-log-level",
        "warning",
        env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"},
    )
    try:
        status, models = server.request("GET", "/v1/models")
        assert status == 200 and models["data"][0]["id"] == REPO_ID  # the name as given
        status, body = server.request(
            "POST", "/v1/completions", {"model": REPO_ID, "prompt": "Hello", "max_tokens": 3}
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 3
    finally:
        assert server.stop() == 0, server.log()


def test_bench_latency_by_name(hub_cache, tmp_path):
    out_json = tmp_path / "lat.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "labkit.cli",
            "bench",
            "latency",
            "--model",
            REPO_ID,
            "--batch-size",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--num-iters-warmup",
            "1",
            "--num-iters",
            "2",
            "--disable-tqdm",
            "--output-json",
            str(out_json),
        ],
        env=_env(hub_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out_json.read_text())["latencies"]) == 2
