"""Where a decode step's GPU time goes, kernel by kernel (torch.profiler with CUDA activity;
kernels replayed from CUDA graphs are traced one by one). Dummy weights, bf16; the Qwen2.5-7B
shape unless --config names another shape's config directory (data/configs/Qwen3-30B-A3B).

  python dev/gpu_profile.py --batch 8 --context 1024 --tp 1 --out DIR [--config DIR]

Prints the kernels by total GPU time over the profiled steps (per step: count and
microseconds), the GPU-busy time per step against the wall time per step, and writes the table
to DIR/profile_b{batch}_tp{tp}.txt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default=".")
    ap.add_argument("--config", default=str(REPO / "data/configs/Qwen2.5-7B-Instruct"))
    args = ap.parse_args()
    from labkit import LLM, SamplingParams

    llm = LLM(
        args.config,
        load_format="dummy",
        dtype="bfloat16",
        tensor_parallel_size=args.tp,
        skip_tokenizer_init=True,
        max_model_len=4096,
        enable_prefix_caching=False,
    )
    g = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(1000, 100000, (args.context,), generator=g).tolist()}
        for _ in range(args.batch)
    ]
    sp = SamplingParams(temperature=1.0, max_tokens=args.steps + 1, ignore_eos=True)
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up
    engine = llm.engine
    for p in prompts:
        engine.add_request(None, p, sp)
    engine.step()  # the prefill, unprofiled
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    llm.shutdown()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    busy = sum(sum(v) for v in by_name.values())
    lines = [
        f"{torch.cuda.get_device_name()}: batch {args.batch}, context {args.context}, "
        f"tp {args.tp}, {steps} decode steps",
        f"wall {wall / steps * 1e3:.3f} ms/step, GPU busy {busy / steps / 1e3:.3f} ms/step "
        f"({len(kernels) / steps:.0f} kernels/step)",
        f"{'us/step':>9} {'n/step':>7} {'us each':>8}  kernel",
    ]
    for name, ts in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:30]:
        lines.append(
            f"{sum(ts) / steps:9.1f} {len(ts) / steps:7.1f} {sum(ts) / len(ts):8.2f}  {name[:110]}"
        )
    text = "\n".join(lines)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"profile_b{args.batch}_tp{args.tp}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
