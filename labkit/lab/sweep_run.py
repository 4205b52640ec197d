"""A sweep in progress: SweepRun keeps each finished point (in the result, the sweep's file, the
callbacks, the status line and the live chart) and says how the sweep ended; `local()` runs the
points in this process, one engine at a time (labkit.lab.cluster runs them on Ray and hands each
record to the same `keep`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from labkit.lab import sweep_file
from labkit.lab.points import EngineGroup, Point, PointRecord, derive, run_point

log = logging.getLogger("labkit.lab")


class SweepRun:
    """Runs the points group by group (`local`), or is handed them (`keep`) as they finish."""

    def __init__(
        self,
        result,
        groups: dict[int, EngineGroup],
        writer: sweep_file.Writer | None,
        *,
        live: bool | None,
        progress: bool,
        total: int,
        desc: str,
        on_point: Callable[[pd.DataFrame], None] | None,
        on_start: Callable[[Point], None] | None,
        stop: Callable[[], bool] | None,
        profile_dir: str | Path | None,
    ):
        from labkit.lab import charts

        self.result, self.groups, self.writer = result, groups, writer
        self.on_point, self.on_start, self.stop = on_point, on_start, stop
        self.profile_dir = profile_dir
        self.finished, self.stopped = 0, False
        notebook = charts.in_notebook()
        self.chart = None
        if live or (live is None and notebook and charts.has_widgets()):
            from labkit.lab.live import LiveChart

            self.chart = LiveChart(tp_sizes=list(groups))
            self.chart.show()
        from labkit.lab.live import Status

        self.status = Status(total, desc, notebook=notebook, enabled=progress)

    def local(self, todo: list[Point]) -> None:
        for tp, group in self.groups.items():
            mine = [p for p in todo if p.tensor_parallel_size == tp]
            if not mine:
                continue
            if self.should_stop():
                return
            with group.engine() as llm:  # closed (KV cache freed) however the block ends
                for point in mine:
                    if self.should_stop():
                        return
                    self.starting(point)
                    rec = run_point(group, llm, point, profile_dir=self.profile_dir)
                    self.remeasure_if_beaten(group, rec)
                    self.keep(rec)

    def should_stop(self) -> bool:
        self.stopped = self.stopped or (self.stop is not None and bool(self.stop()))
        return self.stopped

    def starting(self, point: Point, status: str | None = None) -> None:
        """`point` starts (`status`: what the status line says, by default the point)."""
        self.status.running(status or point)
        if self.on_start is not None:
            self.on_start(point)

    def remeasure_if_beaten(self, group: EngineGroup, rec: PointRecord) -> None:
        meta = self.result.meta
        if not beats_ceilings(rec.row) or meta.get("ceilings_remeasured"):
            return
        # A point faster than "the" ceiling: the cached figure was measured low (a busy
        # machine). Measure again now and re-derive this engine's rows.
        log.info("a point beat the cached ceilings; measuring them again")
        group.remeasure_ceilings()
        meta["ceilings"] = asdict(group.device_ceilings)
        meta["ceilings_remeasured"] = True
        for other in [*self.result.records, rec]:
            if other.raw and other.row["tensor_parallel_size"] == group.tp:
                other.row = derive(group, Point.of_row(other.row), other.raw)
        self.rows_changed()

    def rows_changed(self) -> None:
        """Rows already kept were derived again (new ceilings): the file's lines are stale."""
        if self.writer is not None:
            self.writer.rewrite(self.result.meta, self.result.records)

    def keep(self, rec: PointRecord) -> None:
        r = self.result
        r.records.append(rec)
        r.df = sweep_file.rows_frame(r.records)
        self.finished += 1
        self.status.finished()
        if self.writer is not None:
            self.writer.point(rec)
        if self.chart is not None:
            self.chart.update(r.df)
        if self.on_point is not None:
            self.on_point(r.df)

    def end(self, what: str, *, interrupted: bool) -> None:
        r = self.result
        r.meta["interrupted"] = interrupted
        if self.writer is not None:
            self.writer.meta(r.meta)
        if self.chart is not None:
            self.chart.freeze(r.df)
        self.status.end(what)


def beats_ceilings(row: dict) -> bool:
    return row["flops_fraction"] > 1 or row["bw_fraction"] > 1
