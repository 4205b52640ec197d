"""`labkit bench guided`: vLLM's benchmark_guided.py keys and flags, every dataset, the ratio
that picks the constrained requests, and the compile cache's worst case (json-unique). The
serving variant runs against a real server in test_server_structured.py."""

from __future__ import annotations

import json

import pytest

from labkit import cli
from labkit.bench import guided

GUIDED_KEYS = {
    "elapsed_time",
    "num_requests",
    "total_num_tokens",
    "total_output_tokens",
    "requests_per_second",
    "tokens_per_second",
    "output_tokens_per_second",
    "correct_rate(%)",
}
QUIET = dict(disable_tqdm=True)


@pytest.mark.slow
# The grammar's longest spelling is ~45 characters: at temperature 1 the model may spell it a
# character a token, and a request cut off before it ends would count as incorrect.
@pytest.mark.parametrize("dataset, output_len", [("choice", 8), ("grammar", 64), ("regex", 24)])
def test_each_dataset_is_constrained_and_scored(default_llm, tmp_path, dataset, output_len):
    out = tmp_path / "g.json"
    r = guided.run(
        llm=default_llm,
        dataset=dataset,
        num_prompts=6,
        output_len=output_len,
        output_json=str(out),
        **QUIET,
    )
    assert set(r) == GUIDED_KEYS and r["num_requests"] == 6
    assert r["correct_rate(%)"] == 100.0 or dataset == "regex"  # \w+ may outrun output_len
    saved = json.loads(out.read_text())
    assert len(saved["outputs"]) == 6 and all(o["constrained"] for o in saved["outputs"])
    assert (tmp_path / "g.steps.csv").exists()


@pytest.mark.slow
def test_ratio_and_json_unique(default_llm):
    compiled = default_llm.engine.structured.num_compiled
    r = guided.run(
        llm=default_llm,
        dataset="json-unique",
        num_prompts=4,
        output_len=4,
        structured_output_ratio=0.5,
        **QUIET,
    )
    assert default_llm.engine.structured.num_compiled == compiled + 2  # 2 of 4, each its own
    assert r["total_output_tokens"] <= 16
    free = guided.run(
        llm=default_llm,
        dataset="choice",
        num_prompts=3,
        output_len=4,
        no_structured_output=True,
        **QUIET,
    )
    assert free["correct_rate(%)"] is None and free["total_output_tokens"] == 12  # EOS ignored
    with pytest.raises(ValueError, match="structured_output_ratio"):
        guided.run(llm=default_llm, dataset="choice", structured_output_ratio=2, **QUIET)


def test_cli_with_vllms_flag_spellings(tiny_ckpts, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert (
        cli.main(
            [
                "bench",
                "guided",
                "--model",
                str(tiny_ckpts["llama"]),
                "--dataset",
                "choice",
                "--num-prompts",
                "3",
                "--output-len",
                "6",
                "--guided-decoding-ratio",
                "1.0",
                "--output-json",
                str(out),
                "--disable-tqdm",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert set(r) == GUIDED_KEYS and r["correct_rate(%)"] == 100.0
    assert {k: v for k, v in json.loads(out.read_text()).items() if k != "outputs"} == r
