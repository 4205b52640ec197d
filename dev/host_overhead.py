"""The engine's host work per decode step (schedule, batch building, sampling, output
processing), with the model's forward replaced by a constant logits tensor: what a step costs
the CPU whatever the device, the part a GPU waits for unless it is hidden.

  python dev/host_overhead.py [--model DIR] [--batch 1,8,256] [--detokenize]

Runs on the CPU with a tiny checkpoint (default: builds tiny-llama with
data/make_tiny_checkpoints.py in a temporary folder). Prints the median phase times of the last
150 decode steps for each batch size. The sample phase here does real CPU work on [batch, 2000]
logits; on a GPU that part runs on the device. --detokenize keeps the tokenizer, so output
processing also turns every token into text, as a user's run does (SmolLM2's tokenizer).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 2000


def tiny_llama() -> Path:
    spec = importlib.util.spec_from_file_location(
        "make_tiny", REPO / "data" / "make_tiny_checkpoints.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_all(Path(tempfile.mkdtemp()))["llama"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", default="1,8,256")
    ap.add_argument("--detokenize", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from labkit import LLM, SamplingParams

    llm = LLM(
        args.model or str(tiny_llama()),
        device="cpu",
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=256,
        enable_prefix_caching=False,
        skip_tokenizer_init=not args.detokenize,
    )
    logits = torch.randn(512, VOCAB)
    # Every sampled row gets the same constant logits: the forward's cost is left out.
    llm.engine.runner.execute = lambda work, sampled=None: logits[
        : sum(len(w.token_ids) if w.all_logits else 1 for w in work if w.sample or w.all_logits)
    ]
    random.seed(0)
    cols = ["schedule_ms", "prepare_ms", "sample_ms", "postprocess_ms", "total_ms"]
    print("batch " + " ".join(f"{c:>15}" for c in cols))
    for bs in map(int, args.batch.split(",")):
        prompts = [
            {"prompt_token_ids": [random.randrange(VOCAB) for _ in range(500)]} for _ in range(bs)
        ]
        llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), use_tqdm=False
        )
        steps = llm.step_log().tail(150)
        med = steps[steps.num_prefill_tokens == 0][cols].median()
        print(f"{bs:5d} " + " ".join(f"{med[c]:15.3f}" for c in cols))
    llm.shutdown()


if __name__ == "__main__":
    main()
