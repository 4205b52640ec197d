"""Programmatic dependent launch (PDL, Hopper and newer), for every labkit kernel.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
running. Each labkit kernel starts with `pdl_wait(USE_PDL)`: it waits (`gdc_wait`) until the
kernel ahead has completed and its writes are visible, then at once lets the kernel after it be
scheduled (`gdc_launch_dependents`), so that one's programs are resident and at their own wait
by the time this one drains. What moves ahead of a wait is only what reads no earlier kernel's
output: the launch itself, and in the decode matmul (gemv.py) its first weight tile. Waits chain,
so a kernel never runs ahead of any earlier one. cuBLAS's GEMMs are not launched with PDL: a
kernel after one of them starts after it in the ordinary way.

`LABKIT_PDL=0` turns it off and `LABKIT_PDL=wait` keeps the early launch but not the early
trigger (to measure what each gives); off under the Triton interpreter and on GPUs before
Hopper, which have no such launch.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def pdl_mode() -> int:
    """0: off; 1: launched early, waits; 2: also triggers its dependents early (the default)."""
    setting = os.environ.get("LABKIT_PDL", "1")
    if os.environ.get("TRITON_INTERPRET") == "1" or setting == "0":
        return 0
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9):
        return 0
    return 1 if setting == "wait" else 2


def pdl_launch_args() -> dict:
    """Keyword arguments for a launch of a kernel that takes `USE_PDL: tl.constexpr` and calls
    `pdl_wait(USE_PDL)` before it reads anything an earlier kernel wrote."""
    mode = pdl_mode()
    return {"USE_PDL": mode, "launch_pdl": mode > 0}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL > 0:
        tl.extra.cuda.gdc_wait()
    if USE_PDL > 1:
        tl.extra.cuda.gdc_launch_dependents()
