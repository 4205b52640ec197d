"""Programmatic dependent launch (PDL, Hopper and newer), for every labkit kernel.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
finishing; its first instruction (`gdc_wait`) waits until that kernel has completed and its writes
are visible. No memory access moves: what overlaps is only the launch and the previous kernel's
tail, the ~1-2 us gap between two kernels of a decode step's CUDA graph (about 400 of them per
step on a 7B model). cuBLAS's GEMMs are not launched with PDL, so a GEMM after one of our kernels
still starts after it in the ordinary way.

`LABKIT_PDL=0` turns it off (to measure what it gives); off under the Triton interpreter and on
GPUs before Hopper, which have no such launch.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def pdl_enabled() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("LABKIT_PDL", "1") == "0":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def pdl_launch_args() -> dict:
    """Keyword arguments for a launch of a kernel that takes `USE_PDL: tl.constexpr` and starts
    with `if USE_PDL: tl.extra.cuda.gdc_wait()`."""
    on = pdl_enabled()
    return {"USE_PDL": on, "launch_pdl": on}
