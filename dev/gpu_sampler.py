"""The sampler on a GPU, alone: labkit.kernels.sampling against the torch path (the
Sampler's other branch, with its sort) on bf16 logits of a 152k vocabulary, per batch size and
sampling mode, plus the kernel's block/warp choices and its split path (a row's first pass by
chunks) against whole rows; and a check that the kernel's draws follow the filtered softmax
(chi-square over many draws, both paths) and its greedy rows equal argmax.

  python dev/gpu_sampler.py --out DIR

Prints a table last; writes gpu_sampler.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from triton.testing import do_bench

from labkit.engine.request import Request
from labkit.engine.sampler import Sampler, apply_top_k_top_p_min_p
from labkit.kernels.sampling import sample
from labkit.layers.switches import KernelSwitches
from labkit.sampling_params import SamplingParams

VOCAB = 152064
MODES = {
    "greedy": SamplingParams(temperature=0),
    "top_p": SamplingParams(temperature=0.8, top_p=0.95),
    "top_k": SamplingParams(temperature=0.8, top_k=50),
    "min_p": SamplingParams(temperature=1.0, min_p=0.1),
}


def realistic_logits(batch: int) -> torch.Tensor:
    """Logits shaped like a language model's: a heavy head over a long tail."""
    g = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, VOCAB, device="cuda", generator=g) * 2.5
    return x.to(torch.bfloat16)


def check(out: dict) -> None:
    v, n = 1000, 200_000
    base = torch.randn(v, device="cuda") * 2
    cases = {
        "top_p": (0.8, 0, 0.9, 0.0),
        "top_k_top_p": (1.0, 20, 0.8, 0.0),
        "min_p": (1.0, 0, 1.0, 0.05),
    }
    for (name, (t, k, p, mp)), split in [(c, s) for c in cases.items() for s in (False, True)]:
        name += "_split" if split else ""
        kth = base.topk(k).values[-1].item() if k else -math.inf
        full = lambda x: torch.full((n,), x, device="cuda")  # noqa: E731
        ids, _ = sample(
            base.expand(n, v).contiguous(),
            full(t),
            full(kth),
            full(p),
            full(mp),
            torch.arange(n, device="cuda", dtype=torch.int64) * 7919,
            split=split,
            split_block=128,
        )
        probs = apply_top_k_top_p_min_p(
            (base / t)[None].cpu(), torch.tensor([k]), torch.tensor([p]), torch.tensor([mp])
        ).softmax(-1)[0]
        counts = torch.bincount(ids.cpu(), minlength=v).double()
        exp = probs.double() * n
        ok = exp >= 5
        chi2 = float((((counts - exp) ** 2 / exp)[ok]).sum())
        out[f"chi2_{name}"] = {
            "chi2": chi2,
            "dof": int(ok.sum()) - 1,
            "cut_tokens_drawn": int(counts[probs == 0].sum()),
        }
    logits = realistic_logits(64)
    for split in (False, True):
        ids, lse = sample(
            logits,
            torch.zeros(64, device="cuda"),
            torch.full((64,), -math.inf, device="cuda"),
            torch.ones(64, device="cuda"),
            torch.zeros(64, device="cuda"),
            torch.zeros(64, dtype=torch.int64, device="cuda"),
            split=split,
        )
        tag = "_split" if split else ""
        out["greedy_equal" + tag] = bool((ids == logits.float().argmax(-1)).all())
        out["lse_max_err" + tag] = float((lse - logits.float().logsumexp(-1)).abs().max())


def timings(out: dict) -> list:
    rows = []
    for batch in (1, 8, 64, 256):
        logits = realistic_logits(batch)
        for mode, sp in MODES.items():
            reqs = [Request("r", "r", 0, None, [1], sp) for _ in range(batch)]
            for name, use in (("torch", False), ("kernel", True)):
                s = Sampler(0, {0}, torch.device("cuda"), KernelSwitches(use_sampling_kernel=use))
                ms = do_bench(lambda s=s: s(logits, reqs).token_ids, warmup=10, rep=100)
                out[f"{name}_{mode}_b{batch}_ms"] = ms
                rows.append((f"{name} {mode} b{batch}", ms))
        n = batch
        for mode, t in (("greedy", 0.0), ("top_p", 0.8)):
            args = (
                torch.full((n,), t, device="cuda"),
                torch.full((n,), -math.inf, device="cuda"),
                torch.full((n,), 0.95, device="cuda"),
                torch.zeros(n, device="cuda"),
                torch.arange(n, dtype=torch.int64, device="cuda"),
            )
            for split, block in ((False, 8192), (True, 2048), (True, 4096), (True, 8192)):
                ms = do_bench(
                    lambda: sample(logits, *args, split=split, split_block=block),
                    warmup=10,
                    rep=100,
                )
                how = f"split {block}" if split else "rows"
                out[f"kernel_{mode}_b{batch}_{how.replace(' ', '')}_ms"] = ms
                rows.append((f"kernel {mode} b{batch} {how}", ms))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    check(out)
    rows = timings(out)
    (out_dir / "gpu_sampler.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("chi2", "greedy", "lse"))}))
    for name, ms in rows:
        print(f"{name:<44}{ms * 1e3:>10.1f} us")


if __name__ == "__main__":
    main()
