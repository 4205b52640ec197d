"""labkit.profile(): where an engine run's time goes, per step and per operator category.

The run is traced by torch.profiler. The engine already labels each step's phases
(record_function ranges schedule / prepare / forward / sample / postprocess); while profiling,
forward hooks also label the model's layers (`labkit::attention`, `labkit::matmul`,
`labkit::norm/rope/activation`, `labkit::other`) and the TP group's collectives label
themselves (`labkit::communication`), so every traced operator is attributed by the innermost
labelled range around it:

  attention             the attention layers: KV-cache writes and gathers, SDPA
  matmul                linear layers and the LM head
  norm/rope/activation  RMSNorm (with its residual add), rotary embedding, SiLU-and-mul (on
                        CUDA rotary is fused into the attention layer's KV-cache write, and
                        counts as attention)
  sampling              everything in the engine's sample phase
  communication         the TP group's collectives (all-reduce, all-gather), wherever they run
  engine                the schedule, prepare and postprocess phases (Python and their ops)
  other                 the rest of the forward (embedding, residual plumbing) and ops outside
                        phases

A category's time is the self time (CPU; device time on CUDA) of every event attributed to it,
ranges included, so the Python between operators counts where it runs. Only the time outside any
traced event (the engine loop between steps) is left over: `coverage` = categories / wall time.
Each step is prefill (it computed prompt tokens) or decode by its step-log row. Only this process
is traced: with tensor parallelism, rank 0. CUDA graphs replay without the layer hooks; profile
with enforce_eager=True to split their time by category.

The capture and the attribution are labkit.observe.profiler and labkit.observe.attribution; this
module runs them on an LLM (its engine's `profile_labels()`, its step log) and shows the result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.observe import profiler
from labkit.observe.attribution import CATEGORIES
from labkit.observe.profiler import Capture, Profile

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from labkit.entrypoints.llm import LLM

__all__ = ["CATEGORIES", "Capture", "ProfileResult", "profile", "profiling"]


@dataclass(repr=False)
class ProfileResult(Profile):
    """A Profile with the run's outputs, shown in a notebook as the step timeline, the category
    chart and the category table."""

    outputs: list = field(default_factory=list)

    def timeline(self) -> go.Figure:
        from labkit.lab import profile_charts

        return profile_charts.step_timeline(self.steps)

    def category_chart(self) -> go.Figure:
        from labkit.lab import profile_charts

        return profile_charts.category_times(self.categories)

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        display(
            HTML(
                f"<b>labkit profile</b>: {len(self.steps)} steps, "
                f"{self.wall_ms:.0f} ms wall, {self.coverage:.0%} attributed to operator "
                f"categories; trace: <code>{self.trace_path}</code> "
                "(open in ui.perfetto.dev)"
            )
        )
        display(self.timeline(), self.category_chart(), self.categories.round(2))


def profile(
    llm: LLM,
    prompts,
    sampling_params=None,
    *,
    trace_dir: str | Path | None = None,
    use_tqdm: bool = False,
) -> ProfileResult:
    """Profile `llm.generate(prompts, sampling_params)`; the outputs are in `.outputs`."""
    with profiling(llm, trace_dir) as capture:
        outputs = llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)
    capture.result.outputs = outputs
    return capture.result


@contextlib.contextmanager
def profiling(llm: LLM, trace_dir: str | Path | None = None) -> Iterator[Capture]:
    """`with profiling(llm) as cap: ...` profiles whatever the block runs on `llm`; then
    `cap.result` is the ProfileResult."""
    capture = Capture()
    cuda = llm.config.device.startswith("cuda")
    with profiler.profiling(
        llm.engine.profile_labels(), llm.step_log, cuda=cuda, trace_dir=trace_dir
    ) as inner:
        yield capture
    capture.result = ProfileResult(**vars(inner.result))
