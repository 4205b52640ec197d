"""The /metrics endpoint: vLLM's Prometheus metrics under a `labkit:` prefix, every sample
labelled model_name. Written by the engine thread, rendered by the HTTP thread, hence the lock.
Hand-rolled text format (version 0.0.4): a few counters, gauges and histograms need no library."""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

PREFIX = "labkit:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets for each histogram.
_TTFT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_TPOT = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_LATENCY = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_ITERATION_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect_left(self.buckets, value)] += count
        self.total += value * count


class ServerMetrics:
    def __init__(self, model_name: str):
        self.label = f'model_name="{_escape(model_name)}"'
        self._lock = threading.Lock()
        self.gauges = {
            "num_requests_running": 0.0,
            "num_requests_waiting": 0.0,
            "kv_cache_usage_perc": 0.0,
        }
        self.counters = {
            "prefix_cache_queries": 0,
            "prefix_cache_hits": 0,
            "num_preemptions": 0,
            "prompt_tokens": 0,
            "generation_tokens": 0,
        }
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.histograms = {
            "time_to_first_token_seconds": Histogram(_TTFT),
            "time_per_output_token_seconds": Histogram(_TPOT),
            "e2e_request_latency_seconds": Histogram(_LATENCY),
            "request_queue_time_seconds": Histogram(_LATENCY),
            "request_prefill_time_seconds": Histogram(_LATENCY),
            "request_decode_time_seconds": Histogram(_LATENCY),
            "iteration_tokens_total": Histogram(_ITERATION_TOKENS),
        }

    # ---- written by the engine thread -------------------------------------------------------
    def set_gauges(self, running: int, waiting: int, kv_usage: float) -> None:
        with self._lock:
            self.gauges.update(
                num_requests_running=running,
                num_requests_waiting=waiting,
                kv_cache_usage_perc=kv_usage,
            )

    def inc(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def finished(self, reason: str) -> None:
        with self._lock:
            self.success[reason] = self.success.get(reason, 0) + 1

    def observe(self, name: str, value: float, count: int = 1) -> None:
        with self._lock:
            self.histograms[name].observe(value, count)

    # ---- read by GET /metrics ---------------------------------------------------------------
    def render(self) -> str:
        lines: list[str] = []
        lbl = self.label
        with self._lock:
            for name, v in self.gauges.items():
                lines += [f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name}{{{lbl}}} {v}"]
            # As prometheus_client writes counters: the sample and its TYPE line end in _total.
            for name, v in self.counters.items():
                lines += [
                    f"# TYPE {PREFIX}{name}_total counter",
                    f"{PREFIX}{name}_total{{{lbl}}} {v}",
                ]
            lines.append(f"# TYPE {PREFIX}request_success_total counter")
            for reason, v in self.success.items():
                lines.append(
                    f'{PREFIX}request_success_total{{finished_reason="{reason}",{lbl}}} {v}'
                )
            for name, h in self.histograms.items():
                lines.append(f"# TYPE {PREFIX}{name} histogram")
                cumulative = 0
                for le, c in zip([*map(str, map(float, h.buckets)), "+Inf"], h.counts):
                    cumulative += c
                    lines.append(f'{PREFIX}{name}_bucket{{le="{le}",{lbl}}} {cumulative}')
                lines += [
                    f"{PREFIX}{name}_sum{{{lbl}}} {h.total}",
                    f"{PREFIX}{name}_count{{{lbl}}} {cumulative}",
                ]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
