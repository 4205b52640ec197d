"""The serving benchmark's figures: each request's record (RequestResult), the checked client
options (metrics, percentiles, goodput SLOs), and from a run's records vLLM's result keys
(throughputs; TTFT, TPOT, ITL and E2EL mean, median, std and percentiles; goodput) and the
per-request details of --save-detailed."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np

from labkit.bench import common

log = logging.getLogger("labkit.bench")


METRICS = ("ttft", "tpot", "itl", "e2el")


GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    generated_text: str = ""
    output_tokens: int | None = None  # the server's usage.completion_tokens, when it sends usage
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def compute_metrics(
    results: list[RequestResult],
    duration: float,
    tok,
    metrics: list[str],
    ps: list[float],
    slos: dict[str, float],
) -> dict:
    """vLLM's calculate_metrics: throughputs over the whole run; TTFT, TPOT, ITL, E2EL over the
    successful requests (each list 0 when empty); goodput = requests within every SLO."""
    done = [r for r in results if r.success]
    out_lens = [_output_len(r, tok) for r in done]
    total_in, total_out = sum(r.prompt_len for r in done), sum(out_lens)
    tpot = [(r.latency - r.ttft) / (n - 1) if n > 1 else 0.0 for r, n in zip(done, out_lens)]
    values = {
        "ttft": [r.ttft for r in done],
        "tpot": [t for t, n in zip(tpot, out_lens) if n > 1],
        "itl": [x for r in done for x in r.itl],
        "e2el": [r.latency for r in done],
    }
    # Goodput counts a one-token request's TPOT as 0, as vLLM does.
    per_request = {"ttft": values["ttft"], "tpot": tpot, "e2el": values["e2el"]}
    good = sum(
        all(per_request[m][i] * 1000 <= slo for m, slo in slos.items()) for i in range(len(done))
    )
    if not done and results:
        log.warning("all %d requests failed; the first error: %s", len(results), results[0].error)
    result = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "request_goodput": good / duration if slos else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    for m in metrics:
        ms = np.asarray(values[m] or [0.0]) * 1000
        result[f"mean_{m}_ms"] = float(np.mean(ms))
        result[f"median_{m}_ms"] = float(np.median(ms))
        result[f"std_{m}_ms"] = float(np.std(ms))
        for label, value in common.percentiles(ms, ps).items():
            result[f"p{label}_{m}_ms"] = value
    return result


def parse_options(
    percentile_metrics: str,
    metric_percentiles: str,
    goodput: list[str] | None,
    request_rate: float,
    burstiness: float,
):
    """The checked client options: (metrics, percentiles, goodput SLOs)."""
    metrics = _parse_list(percentile_metrics, METRICS, "percentile_metrics")
    ps = [float(p) for p in metric_percentiles.split(",")]
    if not all(0 < p < 100 for p in ps):
        raise ValueError(
            f"metric_percentiles={metric_percentiles!r} is invalid: each must be in (0, 100)"
        )
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError(
            f"request_rate={request_rate!r}, burstiness={burstiness!r}: both must be > 0"
        )
    return metrics, ps, parse_goodput(goodput)


def details(results: list[RequestResult], tok) -> dict:
    """Each request's figures, vLLM's detailed keys (plus "e2els")."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [_output_len(r, tok) if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "e2els": [r.latency for r in results],
        "errors": [r.error for r in results],
    }


def _output_len(r: RequestResult, tok) -> int:
    return r.output_tokens or len(tok(r.generated_text, add_special_tokens=False).input_ids)


def _parse_list(text: str, allowed: tuple[str, ...], name: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(
            f"{name}={text!r} is invalid: a comma-separated list of {', '.join(allowed)}"
        )
    return items


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        m = re.fullmatch(rf"({'|'.join(GOODPUT_METRICS)}):(\d+(?:\.\d*)?)", item)
        if m is None:
            raise ValueError(
                f"goodput: {item!r} is invalid: give METRIC:MILLISECONDS with "
                "METRIC one of "
                f"{', '.join(GOODPUT_METRICS)}, e.g. ttft:500 tpot:50"
            )
        slos[m[1]] = float(m[2])
    return slos
