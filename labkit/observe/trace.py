"""torch.profiler traces of a region of a run, written where a user can open them.

`trace_region` is what the benchmarks' `--profile` records: the engine's record_function ranges
(schedule, prepare, forward, sample, postprocess) label each step in the trace.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import torch

log = logging.getLogger("labkit")

DEFAULT_PROFILE_DIR = "labkit_profile"


@contextlib.contextmanager
def trace_region(name: str, enabled: bool, profile_dir: str | None) -> Iterator[None]:
    """With `enabled`, a torch.profiler trace of the block, where the engine's
    record_function ranges (schedule, prepare, forward, sample, postprocess) label each step,
    written as gzipped Chrome/Perfetto JSON, plus the top operators as a text table (printed
    too). Only this process is traced: with tensor parallelism, rank 0."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ) as prof:
        yield
    out = Path(profile_dir or DEFAULT_PROFILE_DIR)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    trace, table_path = Path(f"{stem}.trace.json.gz"), Path(f"{stem}.ops.txt")
    prof.export_chrome_trace(str(trace))
    table = prof.key_averages().table(
        sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25
    )
    table_path.write_text(table)
    print(table)
    log.info("profile: trace %s (open in ui.perfetto.dev), operator table %s", trace, table_path)
