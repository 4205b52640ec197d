"""labkit.serving_sweep(): request rate (or concurrency) against latency, on a real server.

The core output of `vllm bench sweep` and GuideLLM: how TTFT, TPOT and inter-token latency grow
as the offered load does, and how much of the load is served within the SLOs (goodput). Each
point is one run of labkit.bench.serve (vLLM's benchmark_serving client: Poisson arrivals at
`request_rate`, at most `max_concurrency` in flight) with its per-request details, against a
`labkit serve` the sweep starts (and stops) or one given by `url`.

The result holds a row per point (throughputs, goodput, mean / median / percentiles of every
metric) and the requests themselves (`.requests`: TTFT, TPOT, E2EL per request; `.itls`: every
inter-token gap), charted as the throughput-vs-latency curve, the metrics' CDFs and goodput vs
load. As labkit.sweep(): every argument is checked before the server starts, `output=` gets a
line per finished point, an interrupt returns the points so far (`meta["interrupted"]`) and the
server it started is stopped however the sweep ends.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from labkit.bench import serve, serve_metrics
from labkit.lab import env
from labkit.lab.server_process import ServerProcess

log = logging.getLogger("labkit.lab")
FORMAT = "labkit-serving-sweep/1"
METRICS = ("ttft", "tpot", "itl", "e2el")


# ---- the result -------------------------------------------------------------------------------
@dataclass
class ServingSweepResult:
    """`df`: a row per (request rate, max concurrency) point; `requests`: a row per request
    (point index, ttft_ms, tpot_ms, e2el_ms, output_len, error); `itls`: (point, itl_ms) per
    inter-token gap; `meta`: the arguments, SLOs and environment."""

    df: pd.DataFrame
    requests: pd.DataFrame
    itls: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return bool(self.meta.get("interrupted"))

    def plot(self, kind: str | None = None):
        """One figure (`kind` one of labkit.lab.serving_charts.KINDS) or all of them."""
        from labkit.lab import serving_charts

        return serving_charts.charts(self, kind)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [{"format": FORMAT, "meta": self.meta}]
        for i, row in enumerate(self.df.to_dict("records")):
            lines.append(
                {
                    "point": row,
                    "requests": self.requests[self.requests.point == i]
                    .drop(columns="point")
                    .to_dict("list"),
                    "itls": self.itls[self.itls.point == i].itl_ms.tolist(),
                }
            )
        path.write_text("".join(json.dumps(_strict(x)) + "\n" for x in lines))
        return path

    def _repr_html_(self) -> str:
        state = " <b style='color:#c00'>interrupted</b>" if self.interrupted else ""
        cols = [c for c in self.df.columns if not c.startswith(("std_", "mean_itl"))]
        return (
            f"<b>labkit serving sweep</b>: {len(self.df)} points{state}, "
            f"{len(self.requests)} requests"
            + self.df[cols].to_html(index=False, float_format=lambda x: f"{x:.4g}")
        )


def load_serving_sweep(path: str | Path) -> ServingSweepResult:
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    if not lines or lines[0].get("format") != FORMAT:
        raise ValueError(f"{path}: not a labkit serving sweep file")
    points = [x for x in lines[1:] if "point" in x]
    meta = next((x["meta"] for x in reversed(lines) if "meta" in x), {})
    return _build([(p["point"], p["requests"], p["itls"]) for p in points], meta)


def _point_line(p: tuple[dict, dict, list]) -> str:
    return json.dumps(_strict({"point": p[0], "requests": p[1], "itls": p[2]})) + "\n"


RESUME_KEYS = ("model", "num_prompts", "input_len", "output_len", "seed")


def _resumed(path: str | Path, params: dict) -> list[tuple[dict, dict, list]]:
    """The points of an earlier serving sweep's file; refused if its prompts differ."""
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    if not lines or lines[0].get("format") != FORMAT:
        raise ValueError(f"resume: {path} is not a labkit serving sweep file")
    earlier = lines[0]["meta"]["params"]
    for key in RESUME_KEYS:
        if earlier.get(key) != params[key]:
            raise ValueError(
                f"resume: {path} ran {key}={earlier.get(key)!r}, this sweep {key}="
                f"{params[key]!r}; resume a sweep of the same prompts"
            )
    return [(x["point"], x["requests"], x["itls"]) for x in lines[1:] if "point" in x]


def _strict(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _build(points: list[tuple[dict, dict, list]], meta: dict) -> ServingSweepResult:
    rows = [dict(p, request_rate=float(p["request_rate"])) for p, _, _ in points]
    # A metric no request reached is None in a file: NaN, as when it was measured.
    df = pd.DataFrame(rows).apply(lambda c: c.astype(float) if c.isna().all() else c)
    if len(df):  # None (no limit) as a missing integer
        df["max_concurrency"] = pd.array(df.max_concurrency.tolist(), dtype="Int64")
    requests = (
        pd.concat(
            [pd.DataFrame(r).assign(point=i) for i, (_, r, _) in enumerate(points)],
            ignore_index=True,
        )
        if points
        else pd.DataFrame(columns=REQUEST_COLUMNS)
    )
    itls = pd.DataFrame(
        {
            "point": [i for i, (_, _, g) in enumerate(points) for _ in g],
            "itl_ms": [x for _, _, g in points for x in g],
        }
    )
    return ServingSweepResult(df, requests[REQUEST_COLUMNS], itls, meta)


REQUEST_COLUMNS = ["point", "input_len", "output_len", "ttft_ms", "tpot_ms", "e2el_ms", "error"]


# ---- running it -------------------------------------------------------------------------------
def _check(request_rates, max_concurrencies, num_prompts, input_len, output_len, goodput):
    rates = [float(r) for r in request_rates]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"request_rates={request_rates!r} is invalid: each > 0 (inf: all at once)")
    conc = list(max_concurrencies) or [None]
    if any(
        c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1) for c in conc
    ):
        raise ValueError(
            f"max_concurrencies={max_concurrencies!r} is invalid: positive integers "
            "or None (no limit)"
        )
    for name, v in (
        ("num_prompts", num_prompts),
        ("input_len", input_len),
        ("output_len", output_len),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is invalid: must be a positive integer")
    slos = [f"{k}:{v}" for k, v in (goodput or {}).items()]
    serve_metrics.parse_goodput(slos)  # raises on a bad metric or value
    return [(r, c) for c in conc for r in rates], slos


def serving_sweep(
    model: str | None = None,
    *,
    url: str | None = None,
    request_rates=(1.0, 4.0, math.inf),
    max_concurrencies=(None,),
    num_prompts: int = 32,
    input_len: int = 128,
    output_len: int = 32,
    goodput: dict[str, float] | None = None,
    server_args=(),
    seed: int = 0,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    on_point: Callable[[pd.DataFrame], None] | None = None,
    stop: Callable[[], bool] | None = None,
    startup_timeout_s: float = 300,
) -> ServingSweepResult:
    """Every (request rate, max concurrency) pair, one serving benchmark run each: `num_prompts`
    random prompts of `input_len` tokens generating `output_len` (EOS ignored). `url`: a running
    server (else `labkit serve model *server_args` is started and stopped). `goodput`: SLOs in
    ms, e.g. {"ttft": 500, "tpot": 50}: a request counts when within every one. `resume`: an
    earlier serving sweep's file with the same prompts (model, num_prompts, input_len,
    output_len, seed): its points are kept and only the missing (rate, concurrency) pairs run;
    `output=` may be that same file."""
    grid, slos = _check(
        request_rates, max_concurrencies, num_prompts, input_len, output_len, goodput
    )
    meta = {
        "params": dict(
            model=model,
            url=url,
            request_rates=[_strict(r) for r, _ in grid],
            max_concurrencies=[c for _, c in grid],
            num_prompts=num_prompts,
            input_len=input_len,
            output_len=output_len,
            seed=seed,
            server_args=list(server_args),
        ),
        "goodput_slos_ms": goodput or {},
        "environment": env.environment("cpu"),
    }
    points = _resumed(resume, meta["params"]) if resume is not None else []
    done = {(float(p["request_rate"]), p["max_concurrency"]) for p, _, _ in points}
    out = Path(output) if output else None
    if out is not None:  # written anew: the header, then the points kept from `resume`
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(_strict({"format": FORMAT, "meta": meta}))
            + "\n"
            + "".join(_point_line(p) for p in points)
        )
    server = None if url else ServerProcess(model, tuple(server_args), startup_timeout_s)
    result = ServingSweepResult(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), meta)
    try:
        base = url or server.start().url
        for k, (rate, conc) in enumerate(grid):
            if (float(rate), conc) in done:
                continue
            if stop is not None and stop():
                meta["interrupted"] = True
                break
            if progress:
                log.warning(
                    "serving sweep: point %d / %d: request_rate=%s max_concurrency=%s",
                    k + 1,
                    len(grid),
                    rate,
                    conc,
                )
            r = serve.run(
                base_url=base,
                tokenizer=model,
                num_prompts=num_prompts,
                random_input_len=input_len,
                random_output_len=output_len,
                request_rate=rate,
                max_concurrency=conc,
                ignore_eos=True,
                percentile_metrics=",".join(METRICS),
                metric_percentiles="50,90,99",
                goodput=slos or None,
                seed=seed,
                disable_tqdm=True,
                detailed=True,
            )
            points.append(_point(r, rate, conc, num_prompts))
            if out is not None:
                with open(out, "a") as f:
                    f.write(_point_line(points[-1]))
            result = _build(points, meta)
            if on_point is not None:
                on_point(result.df)
    except KeyboardInterrupt:
        meta["interrupted"] = True
        log.warning(
            "serving sweep interrupted after %d of %d points: the rows so far are in the result",
            len(points),
            len(grid),
        )
    finally:
        if server is not None:
            server.stop()
    meta.setdefault("interrupted", False)
    if out is not None:
        with open(out, "a") as f:
            f.write(json.dumps(_strict({"meta": meta})) + "\n")
    return _build(points, meta)


def _point(r: dict, rate: float, conc: int | None, num_prompts: int):
    """A serving run's row (its summary keys, offered load first) and its requests."""
    ok = [not e for e in r["errors"]]
    row = {"request_rate": rate, "max_concurrency": conc}
    row |= {k: v for k, v in r.items() if k in SUMMARY_KEYS or k.endswith("_ms")}
    row["request_goodput"] = math.nan if r["request_goodput"] is None else r["request_goodput"]
    row["goodput_fraction"] = (
        row["request_goodput"] / r["request_throughput"] if r["request_throughput"] else math.nan
    )
    tpot = [
        (e - t) / (n - 1) * 1e3 if ok_ and n > 1 else math.nan
        for e, t, n, ok_ in zip(r["e2els"], r["ttfts"], r["output_lens"], ok)
    ]
    requests = {
        "input_len": r["input_lens"],
        "output_len": r["output_lens"],
        "ttft_ms": [t * 1e3 if o else math.nan for t, o in zip(r["ttfts"], ok)],
        "tpot_ms": tpot,
        "e2el_ms": [t * 1e3 if o else math.nan for t, o in zip(r["e2els"], ok)],
        "error": r["errors"],
    }
    itls = [x * 1e3 for gaps, o in zip(r["itls"], ok) if o for x in gaps]
    return row, requests, itls


SUMMARY_KEYS = (
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
)
