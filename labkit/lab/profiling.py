"""labkit.profile(): where an engine run's time goes, per step and per operator category.

The run is traced by torch.profiler. The engine already labels each step's phases (record_function
ranges schedule / prepare / forward / sample / postprocess); while profiling, forward hooks also
label the model's layers (`labkit::attention`, `labkit::matmul`, `labkit::norm/rope/activation`,
`labkit::other`), so every traced operator is attributed by the innermost labelled range around it:

  attention             the attention layers: KV-cache writes and gathers, SDPA
  matmul                linear layers and the LM head
  norm/rope/activation  RMSNorm (with its residual add), rotary embedding, SiLU-and-mul (on
                        CUDA rotary is fused into the attention layer's KV-cache write, and
                        counts as attention)
  sampling              everything in the engine's sample phase
  communication         the TP group's collectives (all-reduce, all-gather), wherever they run
  engine                the schedule, prepare and postprocess phases (Python and their ops)
  other                 the rest of the forward (embedding, residual plumbing) and ops outside phases

A category's time is the self time (CPU; device time on CUDA) of every event attributed to it,
ranges included, so the Python between operators counts where it runs. Only the time outside any
traced event (the engine loop between steps) is left over: `coverage` = categories / wall time.
Each step is prefill (it computed prompt tokens) or decode by its step-log row. Only this process
is traced: with tensor parallelism, rank 0. CUDA graphs replay without the layer hooks; profile
with enforce_eager=True to split their time by category.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from labkit.observe.trace import DEFAULT_PROFILE_DIR

CATEGORIES = ("attention", "matmul", "norm/rope/activation", "sampling", "communication", "engine", "other")
PHASE_CATEGORY = {"schedule": "engine", "prepare": "engine", "postprocess": "engine", "sample": "sampling",
                  "forward": "other"}
COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "broadcast", "nccl", "gloo")
LABEL_PREFIX = "labkit::"


@dataclass
class ProfileResult:
    steps: pd.DataFrame        # the step log of the profiled run
    categories: pd.DataFrame   # ms per category (rows) for prefill, decode, other steps, and total
    operators: pd.DataFrame    # per operator name, category and phase: calls and self ms
    wall_ms: float             # the profiled region, end to end
    trace_path: Path           # Chrome / Perfetto JSON (gzip): open in ui.perfetto.dev
    outputs: list = field(default_factory=list)

    @property
    def coverage(self) -> float:
        """Attributed time / wall time: the rest ran outside any traced event."""
        return float(self.categories.total_ms.sum()) / self.wall_ms

    def timeline(self):
        from labkit.lab import charts
        return charts.step_timeline(self.steps)

    def category_chart(self):
        from labkit.lab import charts
        return charts.category_times(self.categories)

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display
        display(HTML(f"<b>labkit profile</b>: {len(self.steps)} steps, {self.wall_ms:.0f} ms wall, "
                     f"{self.coverage:.0%} attributed to operator categories; trace: "
                     f"<code>{self.trace_path}</code> (open in ui.perfetto.dev)"))
        display(self.timeline(), self.category_chart(), self.categories.round(2))


def profile(llm, prompts, sampling_params=None, *, trace_dir: str | Path | None = None,
            use_tqdm: bool = False) -> ProfileResult:
    """Profile `llm.generate(prompts, sampling_params)`; the outputs are in `.outputs`."""
    with profiling(llm, trace_dir) as capture:
        outputs = llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)
    capture.result.outputs = outputs
    return capture.result


@dataclass
class Capture:
    result: ProfileResult | None = None   # set when the `with` block ends


@contextlib.contextmanager
def profiling(llm, trace_dir: str | Path | None = None) -> Iterator[Capture]:
    """`with profiling(llm) as cap: ...` profiles whatever the block runs on `llm`; then
    `cap.result` is the ProfileResult."""
    from torch.profiler import ProfilerActivity
    cuda = llm.config.device.startswith("cuda")
    capture, first = Capture(), len(llm.step_log())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _labelled_layers(llm.engine.runner.model), torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        yield capture
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    steps = llm.step_log().iloc[first:].reset_index(drop=True)
    out = Path(trace_dir or DEFAULT_PROFILE_DIR)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"labkit-{datetime.now():%Y%m%d-%H%M%S-%f}.trace.json"
    prof.export_chrome_trace(str(raw))
    # Read back from the file, not prof.events(): building FunctionEvents takes ~10x longer on
    # big runs. Kept gzipped (level 1: a tenth of the size in a fraction of a second).
    data = raw.read_bytes()
    trace = raw.with_suffix(".json.gz")
    with gzip.open(trace, "wb", compresslevel=1) as f:
        f.write(data)
    raw.unlink()
    operators = attribute(json.loads(data)["traceEvents"], steps, cuda)
    capture.result = ProfileResult(steps, category_table(operators), operators, wall_ms, trace)


def _layer_category(module) -> str | None:
    from labkit.layers.activation import SiluAndMul
    from labkit.layers.attention import Attention
    from labkit.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from labkit.layers.linear import ColumnParallelLinear, RowParallelLinear
    from labkit.layers.norm import RMSNorm
    from labkit.layers.rotary import RotaryEmbedding
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
        return "matmul"
    if isinstance(module, VocabParallelEmbedding):   # after ParallelLMHead, its subclass
        return "other"
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, (RMSNorm, RotaryEmbedding, SiluAndMul)):
        return "norm/rope/activation"
    return None


@contextlib.contextmanager
def _labelled_layers(model) -> Iterator[None]:
    """Forward hooks that open a record_function range per labelled layer call, and the same
    range around the TP group's collectives: they call the process group directly, which
    torch.profiler does not see."""
    open_ranges: list = []

    def enter(name: str):
        def hook(module, args):
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            open_ranges.append(rf)
        return hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    def labelled(fn):
        def call(*args, **kwargs):
            with torch.profiler.record_function(LABEL_PREFIX + "communication"):
                return fn(*args, **kwargs)
        return call

    handles, groups = [], {}
    for m in model.modules():
        cat = _layer_category(m)
        if cat is not None:
            handles += [m.register_forward_pre_hook(enter(LABEL_PREFIX + cat)), m.register_forward_hook(leave)]
        if getattr(m, "tp", None) is not None and m.tp.size > 1:
            groups[id(m.tp)] = m.tp
    for g in groups.values():   # instance attributes shadow the methods until deleted
        g.all_reduce, g.gather_last_dim = labelled(g.all_reduce), labelled(g.gather_last_dim)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for g in groups.values():
            del g.all_reduce, g.gather_last_dim


def attribute(events: list[dict], steps: pd.DataFrame, cuda: bool) -> pd.DataFrame:
    """Self time by (operator name, category, phase), from the Chrome-trace events of the
    profiled thread (the one running the engine's `schedule` ranges). Nesting comes from the
    intervals. Steps are found by their phase ranges: each starts with a `schedule` range, and
    only the steps that ran a `forward` have a step-log row (an idle schedule logs none). On CUDA
    a kernel's time goes to the operator whose range launched it."""
    main = next((e["tid"] for e in events if e.get("name") == "schedule" and e.get("ph") == "X"), None)
    cpu = sorted((e for e in events if e.get("ph") == "X" and e.get("tid") == main
                  and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")),
                 key=lambda e: (e["ts"], -e["dur"]))
    # One walk: each event's parent is the innermost open one around it; its category is its
    # own label or its parent's; its self time is its duration less its children's.
    records, stack, roots = [], [], []   # records: [name, category, root index, self µs]
    launches: dict[int, int] = {}        # CUDA correlation id -> index in records
    for e in cpu:
        while stack and e["ts"] >= stack[-1][0]:
            stack.pop()
        parent = records[stack[-1][1]] if stack else None
        if parent is None:
            roots.append(e["name"])
        category = PHASE_CATEGORY.get(e["name"], parent[1] if parent else "other")
        if e["name"].startswith(LABEL_PREFIX):
            category = e["name"].removeprefix(LABEL_PREFIX)
        if any(c in e["name"].lower() for c in COLLECTIVES):
            category = "communication"
        if parent is not None:
            parent[3] -= e["dur"]
        records.append([e["name"], category, len(roots) - 1, e["dur"]])
        stack.append((e["ts"] + e["dur"], len(records) - 1))
        if cuda and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = len(records) - 1
    if cuda:   # device time: each kernel's duration to the record that launched it
        for r in records:
            r[3] = 0.0
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
                i = launches.get(e.get("args", {}).get("correlation"))
                if i is not None:
                    records[i][3] += e["dur"]
    phase_of_root = _root_phases(roots, steps)
    acc: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for name, category, root, self_us in records:
        slot = acc[(name, category, phase_of_root[root])]
        slot[0] += 1
        slot[1] += self_us / 1e3
    rows = [(n, c, p, calls, ms) for (n, c, p), (calls, ms) in acc.items()]
    return (pd.DataFrame(rows, columns=["name", "category", "phase", "calls", "self_ms"])
            .sort_values("self_ms", ascending=False, ignore_index=True))


def _root_phases(roots: list[str], steps: pd.DataFrame) -> list[str]:
    """prefill / decode / other per top-level event: a step's events run from its `schedule` range
    to the next one; the n-th step that ran a forward is the n-th step-log row."""
    groups: list[list[int]] = []
    for i, name in enumerate(roots):
        if name == "schedule" or not groups:
            groups.append([])
        groups[-1].append(i)
    kinds = iter(("prefill" if n else "decode") for n in steps.num_prefill_tokens)
    phases = ["other"] * len(roots)
    for g in groups:
        if roots[g[0]] == "schedule" and any(roots[i] == "forward" for i in g):
            phase = next(kinds, "other")
            for i in g:
                phases[i] = phase
    return phases


def category_table(operators: pd.DataFrame) -> pd.DataFrame:
    """ms per category and phase, every category listed, with the total and its share."""
    t = operators.pivot_table(index="category", columns="phase", values="self_ms", aggfunc="sum", fill_value=0.0)
    t = t.reindex(index=list(CATEGORIES), columns=["prefill", "decode", "other"], fill_value=0.0)
    t.columns = [f"{c}_ms" for c in t.columns]
    t["total_ms"] = t.sum(axis=1)
    t["share"] = t.total_ms / t.total_ms.sum()
    t.index.name = "category"
    return t
