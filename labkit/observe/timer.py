"""Phase timers for the step log. On CUDA each phase is bracketed by CUDA events, so a phase's
time is the device's time, not the time it took the host to launch the kernels. Each phase is
also a torch.profiler `record_function` range, so traces show schedule / prepare / forward /
sample / postprocess by name."""
from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        with torch.profiler.record_function(name):
            if self.cuda:
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

    def collect(self) -> dict[str, float]:
        """Milliseconds per phase since the last collect (synchronizes on CUDA)."""
        if self.cuda and self._marks:
            self._marks[-1][2].synchronize()
        out: dict[str, float] = {}
        for name, start, end in self._marks:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            out[name] = out.get(name, 0.0) + ms
        self._marks.clear()
        return out
