"""Capture a profiled region: a torch.profiler trace, the step-log rows it ran, and the time
per operator category (labkit.observe.attribution).

The caller passes what it knows of the engine: the context that labels the model's layers, the
step log, and whether the device is CUDA. Only this process is traced: with tensor parallelism,
rank 0. CUDA graphs replay without the layer labels; profile with eager execution to split
their time by category.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from labkit.observe.attribution import attribute, category_table
from labkit.observe.trace import DEFAULT_PROFILE_DIR


@dataclass(repr=False)
class Profile:
    steps: pd.DataFrame  # the step-log rows of the profiled region
    categories: pd.DataFrame  # ms per category (rows) for prefill, decode, other steps, and total
    operators: pd.DataFrame  # per operator name, category and phase: calls and self ms
    wall_ms: float  # the profiled region, end to end
    trace_path: Path  # Chrome / Perfetto JSON (gzip): open in ui.perfetto.dev

    @property
    def coverage(self) -> float:
        """Attributed time / wall time: the rest ran outside any traced event."""
        return float(self.categories.total_ms.sum()) / self.wall_ms

    def summary(self) -> str:
        """A few lines: the region, its steps, where the time went, and the trace."""
        top = self.categories.total_ms.sort_values(ascending=False).head(5)
        lines = [
            f"profile: {len(self.steps)} steps, {self.wall_ms:.1f} ms wall, "
            f"{self.coverage:.0%} attributed to operator categories"
        ]
        lines += [f"  {name:<20}{ms:10.2f} ms" for name, ms in top.items()]
        lines.append(f"trace: {self.trace_path} (open in ui.perfetto.dev)")
        return "\n".join(lines)

    def __repr__(self) -> str:  # the DataFrames stay attributes: printing shows the summary
        return self.summary()


@dataclass
class Capture:
    result: Profile | None = None  # set when the `with` block ends without an exception


@contextlib.contextmanager
def profiling(
    labels: AbstractContextManager,
    step_rows: Callable[[], pd.DataFrame],
    *,
    cuda: bool,
    trace_dir: str | Path | None = None,
) -> Iterator[Capture]:
    """`with profiling(engine.profile_labels(), llm.step_log, cuda=...) as cap: ...` traces the
    block with `labels` entered; then `cap.result` is its Profile. `step_rows()` returns the
    whole step log; the rows the block added are the profiled steps."""
    from torch.profiler import ProfilerActivity

    capture, first = Capture(), len(step_rows())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with labels, torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        yield capture
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    steps = step_rows().iloc[first:].reset_index(drop=True)
    trace, events = _write_trace(prof, Path(trace_dir or DEFAULT_PROFILE_DIR))
    operators = attribute(events, steps, cuda)
    capture.result = Profile(steps, category_table(operators), operators, wall_ms, trace)


def _write_trace(prof: torch.profiler.profile, out: Path) -> tuple[Path, list[dict]]:
    """The trace as gzipped Chrome JSON in `out`, and its events."""
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
    return trace, json.loads(data)["traceEvents"]
