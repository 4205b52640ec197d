"""Phase timers for the step log. On CUDA, phases that launch device work (prepare, forward,
sample) are bracketed by CUDA events, so their time is the device's time, not the time it took
the host to launch the kernels. Host-only phases (schedule, postprocess) use the host clock:
they launch nothing, and with async scheduling they run while the device is busy with the
previous step, where events would time the device's queue instead. Each phase is also a
torch.profiler `record_function` range, so traces show the phases by name."""

from __future__ import annotations

import contextlib
import time

import torch

Marks = list[tuple[str, object, object]]


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: Marks = []

    @contextlib.contextmanager
    def phase(self, name: str, host: bool = False):
        with torch.profiler.record_function(name):
            if self.cuda and not host:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
            else:
                start = time.perf_counter()
                yield
                end = time.perf_counter()
        self._marks.append((name, start, end))

    def take(self) -> Marks:
        """The marks since the last take, without waiting for the device."""
        marks, self._marks = self._marks, []
        return marks

    @staticmethod
    def resolve(marks: Marks) -> dict[str, float]:
        """Milliseconds per phase (waits for the last device event among `marks`)."""
        events = [end for _, _, end in marks if not isinstance(end, float)]
        if events:
            events[-1].synchronize()
        out: dict[str, float] = {}
        for name, start, end in marks:
            ms = (end - start) * 1e3 if isinstance(end, float) else start.elapsed_time(end)
            out[name] = out.get(name, 0.0) + ms
        return out
