"""Host -> device copies that never wait for the device.

`torch.tensor(values, device="cuda")` and `.to("cuda")` from ordinary host memory synchronise
with the stream: the host stalls until every kernel queued before the copy has run. Under async
scheduling the host prepares step n+1 while step n runs, so such a copy would throw the overlap
away. These go through pinned memory and are queued on the stream like a kernel (torch's pinned
allocator keeps the buffer alive until the copy has been made).
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device`."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def array_to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy array on `device` (shares the array's memory on the CPU)."""
    host = torch.from_numpy(a)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
