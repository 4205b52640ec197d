"""How far a timing can be trusted: its spread over iterations, and the machine's state while it
ran.

Spread: the mean of n timings with a 95 % confidence interval (Student's t, as n is small); a
percentile only where the samples reach it (p90 needs 9 samples, p99 99: with three samples
"p99" would be the largest of three).

Machine state, sampled around each point: the 1-minute load average and the CPU time other
processes took (the whole machine's busy time minus this process and its children, the TP
workers), as a fraction of all cores; on CUDA the GPU's utilisation, SM clock and memory in use
(torch.cuda, through pynvml where it is installed: every figure is NaN where it can't be read).

`warnings()` names what makes a point untrustworthy: a wide interval, other work on the machine,
a load average above the core count.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("labkit.lab")

# Two-sided 95 % Student's t for 1..30 degrees of freedom; beyond, the normal's 1.96 is close.
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]

MAX_CI_FRACTION = 0.10  # the interval's half-width beyond 10 % of the mean
MAX_OTHER_CPU = 0.20  # other processes used more than a fifth of the machine's cores
MACHINE_COLUMNS = [
    "load_avg_1m",
    "other_cpu_frac",
    "gpu_util_pct",
    "gpu_clock_mhz",
    "gpu_mem_used_gb",
]
# Where a point ran: the node's host name and the device's name ("cpu" on the CPU); on a Ray
# cluster (labkit.lab.cluster) the points of one sweep run on several nodes.
WHERE_COLUMNS = ["node", "device"]


def t95(n: int) -> float:
    """The t quantile for a 95 % interval of the mean of n samples (NaN for n < 2)."""
    if n < 2:
        return math.nan
    return _T95[n - 2] if n - 1 <= len(_T95) else 1.96


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float
    std: float  # sample standard deviation (NaN for one sample)
    ci_low: float
    ci_high: float
    half_width: float  # the t interval's half-width, before clamping

    @classmethod
    def of(cls, values) -> Spread:
        v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
        if len(v) == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        mean = float(v.mean())
        std = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        half = t95(len(v)) * std / math.sqrt(len(v))
        # Clamped to the samples' range: with two or three wild timings the t interval can reach
        # below zero, and no mean of timings lies outside what was measured by much.
        return cls(
            len(v),
            mean,
            std,
            max(mean - half, float(v.min())),
            min(mean + half, float(v.max())),
            half,
        )

    @property
    def ci_fraction(self) -> float:
        """The interval's half-width as a fraction of the mean."""
        return self.half_width / self.mean if self.mean else math.nan


def percentile(values, p: float) -> float:
    """The p-th percentile, NaN unless the samples reach it: p90 needs 9, p99 99 (p50 one)."""
    n = len(values)
    if n == 0 or n < 100 / (100 - p) - 1 - 1e-9:
        return math.nan
    return float(np.percentile(values, p))


# ---- the machine's state -------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """CPU counters at one moment: wall clock, the machine's busy CPU seconds, this process
    tree's."""

    wall: float
    busy: float
    own: float


def sample() -> Sample:
    try:
        import psutil
    except ImportError:
        return Sample(time.perf_counter(), math.nan, math.nan)
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    return Sample(time.perf_counter(), busy, _own_cpu(psutil))


def _own_cpu(psutil) -> float:
    """CPU seconds of this process and its live children (the TP workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # it exited between listing and asking
            pass
    return total


def where(device: str) -> dict:
    """WHERE_COLUMNS of this process's `device`."""
    import socket

    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu"
    return {"node": socket.gethostname(), "device": name}


def state(since: Sample, device: str) -> dict:
    """The machine's state between `since` and now: MACHINE_COLUMNS and WHERE_COLUMNS."""
    now = sample()
    wall = now.wall - since.wall
    other = (now.busy - since.busy) - (now.own - since.own)
    cpus = os.cpu_count() or 1
    out = {
        "load_avg_1m": _load_avg(),
        "other_cpu_frac": max(other, 0.0) / (wall * cpus) if wall > 0 else math.nan,
        "gpu_util_pct": math.nan,
        "gpu_clock_mhz": math.nan,
        "gpu_mem_used_gb": math.nan,
    }
    if device.startswith("cuda"):
        out.update(_gpu_state(device))
    return out | where(device)


def _load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return math.nan


def _gpu_state(device: str) -> dict:
    import torch

    out = {}
    readers = {
        "gpu_util_pct": lambda: torch.cuda.utilization(device),  # these two need pynvml
        "gpu_clock_mhz": lambda: torch.cuda.clock_rate(device),
        "gpu_mem_used_gb": lambda: (lambda free, total: (total - free) / 1e9)(
            *torch.cuda.mem_get_info(device)
        ),
    }
    for key, read in readers.items():
        try:
            out[key] = float(read())
        except Exception:  # no pynvml, no permission, an unsupported card: leave it NaN
            out[key] = math.nan
    return out


def warnings(latency: Spread, machine: dict) -> list[str]:
    """Why a point's timing may not be trusted (empty when nothing is known against it)."""
    out = []
    if latency.n < 2:
        out.append("1 timed iteration: spread unknown")
    elif latency.ci_fraction > MAX_CI_FRACTION:
        out.append(
            f"noisy: 95% CI ±{latency.ci_fraction:.0%} of the mean over {latency.n} iterations"
        )
    other = machine.get("other_cpu_frac", math.nan)
    if other > MAX_OTHER_CPU:
        out.append(f"busy machine: other processes used {other:.0%} of the CPU")
    load, cpus = machine.get("load_avg_1m", math.nan), os.cpu_count() or 1
    if load > cpus:
        out.append(f"load average {load:.1f} on {cpus} cores")
    return out


def warn_untrustworthy(df) -> None:
    """One warning for a sweep's points (a DataFrame with the warnings column) that beat the
    ceilings even measured again, or ran noisy or on a busy machine."""
    if len(df) and ((df.flops_fraction > 1).any() or (df.bw_fraction > 1).any()):
        log.warning(
            "some points beat this machine's ceilings even measured again: the copy and "
            "matmul microbenchmarks are not the limit there (caches?)"
        )
    noisy = df[df.warnings.str.contains("noisy|busy|load average", na=False)]
    if len(noisy):
        said = dict.fromkeys(
            w.split(":")[0]
            for ws in noisy.warnings
            for w in ws.split("; ")
            if not w.startswith("1 timed")
        )
        log.warning(
            "%d of %d points may not be trustworthy (%s; see the warnings column)",
            len(noisy),
            len(df),
            ", ".join(said),
        )
