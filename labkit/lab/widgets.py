"""labkit.dashboard(): labkit.sweep() behind ipywidgets controls.

Controls for the model, batch sizes, input and output lengths, TP sizes, backend, mode and
iterations; Run starts the sweep in the kernel, the progress bar and the live chart follow it
point by point, and the export buttons write the DataFrame as CSV or JSON.
"""
from __future__ import annotations

from pathlib import Path

import ipywidgets as w

from labkit.lab import charts, sweeps


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _text(values) -> str:
    return ", ".join(map(str, values))


class Dashboard:
    """`.widget` is the ipywidgets box (what a notebook shows), `.result` the last SweepResult;
    `.run()` does what the Run button does."""

    def __init__(self, model: str | None = None, batch_sizes=sweeps.DEFAULTS.batch_sizes,
                 input_lens=sweeps.DEFAULTS.input_lens, output_lens=sweeps.DEFAULTS.output_lens,
                 tensor_parallel_sizes=sweeps.DEFAULTS.tensor_parallel_sizes,
                 backend: str = sweeps.DEFAULTS.backend, mode: str = sweeps.DEFAULTS.mode,
                 num_iters: int = sweeps.DEFAULTS.num_iters, export_dir: str | Path = ".", **engine_args):
        self.engine_args, self.export_dir = engine_args, Path(export_dir)
        self.result: sweeps.SweepResult | None = None
        self.model = w.Text(model or "", description="model", placeholder="default (SmolLM2-135M-Instruct)")
        self.batch_sizes = w.Text(_text(batch_sizes), description="batch sizes")
        self.input_lens = w.Text(_text(input_lens), description="input lens")
        self.output_lens = w.Text(_text(output_lens), description="output lens")
        self.tp_sizes = w.Text(_text(tensor_parallel_sizes), description="TP sizes")
        self.backend = w.Dropdown(options=list(sweeps.throughput.BACKENDS), value=backend, description="backend")
        self.mode = w.Dropdown(options=list(sweeps.MODES), value=mode, description="mode")
        self.num_iters = w.BoundedIntText(num_iters, min=1, max=1000, description="iterations")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.csv_button = w.Button(description="Export CSV", icon="download", disabled=True)
        self.json_button = w.Button(description="Export JSON", icon="download", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="points")
        self.status = w.HTML("Set the grid and press Run.")
        self.log = w.Output()   # errors from a button press show here, not in the kernel's log
        self.chart = charts.LiveChart()
        self.run_button.on_click(lambda _: self._guarded(self.run))
        self.csv_button.on_click(lambda _: self._guarded(lambda: self.export("csv")))
        self.json_button.on_click(lambda _: self._guarded(lambda: self.export("json")))
        controls = w.GridBox([self.model, self.batch_sizes, self.input_lens, self.output_lens, self.tp_sizes,
                              self.backend, self.mode, self.num_iters],
                             layout=w.Layout(grid_template_columns="repeat(2, 360px)"))
        buttons = w.HBox([self.run_button, self.progress, self.csv_button, self.json_button])
        self.widget = w.VBox([controls, buttons, self.status, self.chart.widget, self.log])

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)

    def _guarded(self, fn) -> None:
        with self.log:
            try:
                fn()
            except Exception as e:   # a bad field: say so next to the controls, keep the dashboard
                self.status.value = f"<span style='color:#c00'>{type(e).__name__}: {e}</span>"
                self.run_button.disabled = False

    def run(self) -> sweeps.SweepResult:
        grid = dict(batch_sizes=_ints(self.batch_sizes.value), input_lens=_ints(self.input_lens.value),
                    output_lens=_ints(self.output_lens.value), tensor_parallel_sizes=_ints(self.tp_sizes.value))
        total = 1
        for values in grid.values():
            total *= len(values)
        self.progress.max, self.progress.value = max(total, 1), 0
        self.run_button.disabled = True
        self.status.value = f"running {total} points..."

        def on_point(df) -> None:
            self.progress.value = len(df)
            self.chart.update(df)
            self.status.value = f"{len(df)} / {total} points"

        self.result = sweeps.sweep(model=self.model.value.strip() or None, mode=self.mode.value,
                                   backend=self.backend.value, num_iters=self.num_iters.value, progress=False,
                                   live=False, on_point=on_point, **grid, **self.engine_args)
        self.run_button.disabled = False
        self.csv_button.disabled = self.json_button.disabled = False
        self.status.value = f"done: {len(self.result.df)} points"
        return self.result

    def export(self, fmt: str) -> Path:
        path = self.export_dir / f"sweep.{fmt}"
        if fmt == "csv":
            path.parent.mkdir(parents=True, exist_ok=True)
            self.result.df.to_csv(path, index=False)
        else:
            self.result.save(path)
        self.status.value = f"wrote <code>{path.resolve()}</code>"
        return path


def dashboard(model: str | None = None, **kwargs) -> Dashboard:
    """A Dashboard (see its arguments); a notebook cell's value displays it."""
    return Dashboard(model, **kwargs)
