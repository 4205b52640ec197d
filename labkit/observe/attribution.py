"""A torch.profiler Chrome trace -> self time per operator, time category and step phase.

Every traced operator is attributed by the innermost labelled range around it: the engine's
phase ranges (schedule / prepare / forward / sample / structured / postprocess) and the
`labkit::<category>` ranges of labelled layers and collectives (labkit.observe.labels). A
category's time is the self time (CPU; device time on CUDA) of every event attributed to it,
ranges included, so the Python between operators counts where it runs. Each step is prefill
(it computed prompt tokens) or decode by its step-log row.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd

from labkit.observe.labels import LABEL_PREFIX

CATEGORIES = (
    "attention",
    "matmul",
    "norm/rope/activation",
    "sampling",
    "structured output",
    "communication",
    "engine",
    "other",
)
PHASE_CATEGORY = {
    "schedule": "engine",
    "prepare": "engine",
    "postprocess": "engine",
    "sample": "sampling",
    "structured": "structured output",
    "forward": "other",
}
# Collectives by operator name: those that bypass the labelled ranges still count here.
COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "broadcast", "nccl", "gloo")
_HOST_EVENTS = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
_DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def attribute(events: list[dict], steps: pd.DataFrame, cuda: bool) -> pd.DataFrame:
    """Self time by (operator name, category, phase), from the Chrome-trace events of the
    profiled thread (the one running the engine's `schedule` ranges). Nesting comes from the
    intervals. Steps are found by their phase ranges: each starts with a `schedule` range, and
    only the steps that ran a `forward` have a step-log row (an idle schedule logs none). On CUDA
    a kernel's time goes to the operator whose range launched it."""
    main = next(
        (e["tid"] for e in events if e.get("name") == "schedule" and e.get("ph") == "X"), None
    )
    cpu = sorted(
        (
            e
            for e in events
            if e.get("ph") == "X" and e.get("tid") == main and e.get("cat") in _HOST_EVENTS
        ),
        key=lambda e: (e["ts"], -e["dur"]),
    )
    # One walk: each event's parent is the innermost open one around it; its category is its
    # own label or its parent's; its self time is its duration less its children's.
    records, stack, roots = [], [], []  # records: [name, category, root index, self µs]
    launches: dict[int, int] = {}  # CUDA correlation id -> index in records
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
    if cuda:  # device time: each kernel's duration to the record that launched it
        for r in records:
            r[3] = 0.0
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in _DEVICE_EVENTS:
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
    return pd.DataFrame(
        rows, columns=["name", "category", "phase", "calls", "self_ms"]
    ).sort_values("self_ms", ascending=False, ignore_index=True)


def _root_phases(roots: list[str], steps: pd.DataFrame) -> list[str]:
    """prefill / decode / other per top-level event: a step's events run from its `schedule`
    range to the next one; the n-th step that ran a forward is the n-th step-log row."""
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
    t = operators.pivot_table(
        index="category", columns="phase", values="self_ms", aggfunc="sum", fill_value=0.0
    )
    t = t.reindex(index=list(CATEGORIES), columns=["prefill", "decode", "other"], fill_value=0.0)
    t.columns = [f"{c}_ms" for c in t.columns]
    t["total_ms"] = t.sum(axis=1)
    t["share"] = t.total_ms / t.total_ms.sum()
    t.index.name = "category"
    return t
