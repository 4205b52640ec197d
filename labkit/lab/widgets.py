"""labkit.dashboard(): labkit.sweep() behind ipywidgets controls.

Controls for the model, batch sizes, input and output lengths, TP sizes, backend, mode and
iterations. Run starts the sweep on a thread of its own, so the kernel stays free for Stop (the
sweep ends after the point in progress, its engine closed, the rows so far kept) and for the
progress bar, the status line (the point running, elapsed time, how it ended) and three live
charts (latency, throughput, % of the floor). When a run ends the charts are also left as static
figures below the dashboard, so a saved notebook shows them. The export buttons write the
DataFrame as CSV or the sweep's file. `cluster=` (labkit.sweep's) runs the sweeps on Ray.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import ipywidgets as w

from labkit.lab import live, sweeps

CHARTS = ("latency", "throughput", "floor")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _text(values) -> str:
    return ", ".join(map(str, values))


class Dashboard:
    """`.widget` is the ipywidgets box (what a notebook shows), `.result` the last SweepResult;
    `.run()` runs a sweep here and now, `.start()` on a thread (what Run does), `.stop()` ends it
    after the point in progress (what Stop does), `.wait()` waits for it."""

    def __init__(
        self,
        model: str | None = None,
        batch_sizes=sweeps.DEFAULTS.batch_sizes,
        input_lens=sweeps.DEFAULTS.input_lens,
        output_lens=sweeps.DEFAULTS.output_lens,
        tensor_parallel_sizes=sweeps.DEFAULTS.tensor_parallel_sizes,
        backend: str = sweeps.DEFAULTS.backend,
        mode: str = sweeps.DEFAULTS.mode,
        num_iters: int = sweeps.DEFAULTS.num_iters,
        export_dir: str | Path = ".",
        **engine_args,
    ):
        self.engine_args, self.export_dir = engine_args, Path(export_dir)
        if engine_args.get("cluster") is not None:
            # Joined (or started) here, on the notebook's thread: the sweeps run on threads of
            # their own, and a local Ray started from one would stop with it.
            from labkit.lab import cluster

            cluster.connect(engine_args["cluster"])
        self.result: sweeps.SweepResult | None = None
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._static: dict = {}
        self.model = w.Text(
            model or "", description="model", placeholder="default (SmolLM2-135M-Instruct)"
        )
        self.batch_sizes = w.Text(_text(batch_sizes), description="batch sizes")
        self.input_lens = w.Text(_text(input_lens), description="input lens")
        self.output_lens = w.Text(_text(output_lens), description="output lens")
        self.tp_sizes = w.Text(_text(tensor_parallel_sizes), description="TP sizes")
        self.backend = w.Dropdown(
            options=list(sweeps.throughput.BACKENDS), value=backend, description="backend"
        )
        self.mode = w.Dropdown(options=list(sweeps.MODES), value=mode, description="mode")
        self.num_iters = w.BoundedIntText(num_iters, min=1, max=1000, description="iterations")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(
            description="Stop", button_style="danger", icon="stop", disabled=True
        )
        self.csv_button = w.Button(description="Export CSV", icon="download", disabled=True)
        self.json_button = w.Button(description="Export JSON", icon="download", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="points")
        self.status = w.HTML("Set the grid and press Run.")
        self.charts = {k: live.LiveChart(k) for k in CHARTS}
        self.chart = self.charts["latency"]
        self.run_button.on_click(lambda _: self._guarded(self.start))
        self.stop_button.on_click(lambda _: self.stop())
        self.csv_button.on_click(lambda _: self._guarded(lambda: self.export("csv")))
        self.json_button.on_click(lambda _: self._guarded(lambda: self.export("jsonl")))
        controls = w.GridBox(
            [
                self.model,
                self.batch_sizes,
                self.input_lens,
                self.output_lens,
                self.tp_sizes,
                self.backend,
                self.mode,
                self.num_iters,
            ],
            layout=w.Layout(grid_template_columns="repeat(2, 360px)"),
        )
        buttons = w.HBox(
            [self.run_button, self.stop_button, self.progress, self.csv_button, self.json_button]
        )
        tabs = w.Tab([c.widget for c in self.charts.values()])
        for i, k in enumerate(CHARTS):
            tabs.set_title(i, k)
        self.widget = w.VBox([controls, buttons, self.status, tabs])

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        display(self.widget)
        # Where each run leaves its charts as static figures: what a saved notebook shows.
        self._static = {k: display(HTML(""), display_id=True) for k in CHARTS}

    def _guarded(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # a bad field: say so next to the controls, keep the dashboard
            self._say(f"<span style='color:#c00'>{type(e).__name__}: {html.escape(str(e))}</span>")
            self._idle()

    def _say(self, text: str) -> None:
        self.status.value = text

    def _idle(self) -> None:
        self.run_button.disabled, self.stop_button.disabled = False, True

    def _grid(self) -> dict:
        return dict(
            batch_sizes=_ints(self.batch_sizes.value),
            input_lens=_ints(self.input_lens.value),
            output_lens=_ints(self.output_lens.value),
            tensor_parallel_sizes=_ints(self.tp_sizes.value),
        )

    def start(self) -> None:
        """Run on a thread (the fields are read now, so a bad one is reported at once)."""
        if self.thread is not None and self.thread.is_alive():
            raise RuntimeError("a sweep is running: Stop it first")
        grid = self._grid()
        self.thread = threading.Thread(
            target=lambda: self._guarded(lambda: self.run(grid)),
            name="labkit-dashboard",
            daemon=True,
        )
        self.run_button.disabled = True
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.stop_button.disabled = True
        self._say(self.status.value + " &mdash; stopping after this point")

    def wait(self, timeout: float | None = None) -> sweeps.SweepResult | None:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.result

    def run(self, grid: dict | None = None) -> sweeps.SweepResult:
        grid = grid or self._grid()
        total = 1
        for values in grid.values():
            total *= len(values)
        self._stop.clear()
        self.progress.max, self.progress.value = max(total, 1), 0
        self.run_button.disabled, self.stop_button.disabled = True, False
        started = time.monotonic()
        for c in self.charts.values():
            c.tp_sizes = tuple(grid["tensor_parallel_sizes"])
            c.update(live.EMPTY)
        self._say(f"loading the model for {total} points...")

        def on_start(point) -> None:
            self._say(
                f"running point {self.progress.value + 1} / {total}: {point} "
                f"({time.monotonic() - started:.0f} s)"
            )

        def on_point(df) -> None:
            self.progress.value = len(df)
            for c in self.charts.values():
                c.update(df)

        try:
            self.result = sweeps.sweep(
                model=self.model.value.strip() or None,
                mode=self.mode.value,
                backend=self.backend.value,
                num_iters=self.num_iters.value,
                progress=False,
                live=False,
                on_start=on_start,
                on_point=on_point,
                stop=self._stop.is_set,
                **grid,
                **self.engine_args,
            )
        finally:
            self._idle()
        r, elapsed = self.result, time.monotonic() - started
        flagged = int(r.df.warnings.str.contains("noisy|busy|load average", na=False).sum())
        end = (
            f"stopped after {len(r.df)} of {total} points"
            if r.interrupted
            else f"done: {len(r.df)} points"
        )
        self._say(
            f"{end} in {elapsed:.0f} s"
            + (f"; {flagged} flagged untrustworthy (see the warnings column)" if flagged else "")
        )
        self.csv_button.disabled = self.json_button.disabled = len(r.df) == 0
        for k, handle in self._static.items():
            handle.update(live.mimebundle(self.charts[k].figure(r.df)), raw=True)
        return r

    def export(self, fmt: str) -> Path:
        path = self.export_dir / f"sweep.{fmt}"
        if fmt == "csv":
            path.parent.mkdir(parents=True, exist_ok=True)
            self.result.df.to_csv(path, index=False)
        else:
            self.result.save(path)
        self._say(f"wrote <code>{path.resolve()}</code>")
        return path


def dashboard(model: str | None = None, **kwargs) -> Dashboard:
    """A Dashboard (see its arguments); a notebook cell's value displays it."""
    return Dashboard(model, **kwargs)
