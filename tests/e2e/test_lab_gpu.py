"""The lab on a GPU (skipped without CUDA): a sweep with CUDA graphs, and a profile whose
kernel times are attributed by the ranges that launched them. Random weights on the
Qwen2.5-0.5B-Instruct shape (data/configs), so no checkpoint is needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import labkit
from labkit import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODEL = str(Path(__file__).resolve().parents[2] / "data" / "configs" / "Qwen2.5-0.5B-Instruct")
DUMMY = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=2048)


def test_sweep_on_gpu():
    r = labkit.sweep(
        MODEL,
        batch_sizes=[1, 16],
        input_lens=[256],
        output_lens=[32],
        num_iters=2,
        progress=False,
        live=False,
        **DUMMY,
    )
    df = r.df
    # Two timed iterations: the mean and its interval, no p90 / p99 (too few samples).
    measured = df.drop(columns=["p90_latency_s", "p99_latency_s", "warnings"])
    assert measured.notna().all().all(), measured.columns[measured.isna().any()].tolist()
    assert (df.ttft_s < df.avg_latency_s).all() and (df.decode_tok_s[1] > df.decode_tok_s[0])
    assert ((df.bw_fraction > 0) & (df.floor_fraction > 0)).all()
    assert r.meta["environment"]["device_name"] == torch.cuda.get_device_name()
    print(
        df[
            [
                "batch_size",
                "avg_latency_s",
                "ttft_s",
                "tpot_s",
                "decode_gbps",
                "bw_fraction",
                "prefill_gflops",
                "flops_fraction",
                "floor_fraction",
            ]
        ].to_string()
    )


@pytest.mark.parametrize("eager", [True, False])
def test_profile_on_gpu(eager, tmp_path):
    prompts = [{"prompt_token_ids": list(range(100 + i, 356 + i))} for i in range(4)]
    with LLM(MODEL, enforce_eager=eager, **DUMMY) as llm:
        llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)
        report = labkit.profile(
            llm, prompts, SamplingParams(max_tokens=16, ignore_eos=True), trace_dir=tmp_path
        )
    table = report.categories
    print(
        f"eager={eager}: wall {report.wall_ms:.1f} ms, "
        f"device time {table.total_ms.sum():.1f} ms\n{table}"
    )
    assert len(report.steps) == 16 and table.total_ms.sum() > 0
    assert table.loc["matmul", "total_ms"] > 0 and table.loc["sampling", "total_ms"] > 0
    if eager:  # graphs replay without the layer ranges: only eager steps split by layer
        assert (
            table.loc["attention", "decode_ms"] > 0
            and table.loc["norm/rope/activation", "decode_ms"] > 0
        )
