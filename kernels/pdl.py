"""Programmatic dependent launch (PDL, Hopper and newer), for every labkit kernel.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
running. Each labkit kernel starts with `pdl_wait(USE_PDL)`: it waits (`gdc_wait`) until the
kernel ahead has completed and its writes are visible, then at once lets the kernel after it be
scheduled (`gdc_launch_dependents`), so that one's programs are resident and at their own wait
by the time this one drains. What moves ahead of a wait is only what reads no earlier kernel's
output: the launch itself, and in the decode matmul (gemv.py) its first weight tile. Waits chain,
so a kernel never runs ahead of any earlier one. cuBLAS's GEMMs are not launched with PDL: a
kernel after one of them starts after it in the ordinary way.

The engine reads `LABKIT_PDL` once when it starts (labkit.layers.switches) and hands the mode to
every launcher, which takes it as an argument (default 0: off). `LABKIT_PDL=0` turns it off and
`LABKIT_PDL=wait` keeps the early launch but not the early trigger (to measure what each gives);
`pdl_mode` keeps it off under the Triton interpreter and on GPUs before Hopper, which have no such
launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

OFF, WAIT, TRIGGER = 0, 1, 2


def pdl_mode(setting: str, device: torch.device) -> int:
    """The mode for kernels on `device` given `LABKIT_PDL`'s value `setting` ("1", the default
    when unset; "wait"; "0"): OFF, WAIT (launched early, waits) or TRIGGER (also lets its
    dependents launch early)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or setting == "0" or device.type != "cuda":
        return OFF
    if torch.cuda.get_device_capability(device)[0] < 9:
        return OFF
    return WAIT if setting == "wait" else TRIGGER


def pdl_launch_args(mode: int) -> dict:
    """Keyword arguments for a launch, in `mode`, of a kernel that takes `USE_PDL: tl.constexpr`
    and calls `pdl_wait(USE_PDL)` before it reads anything an earlier kernel wrote."""
    return {"USE_PDL": mode, "launch_pdl": mode > OFF}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL > 0:
        tl.extra.cuda.gdc_wait()
    if USE_PDL > 1:
        tl.extra.cuda.gdc_launch_dependents()
