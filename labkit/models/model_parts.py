"""ModelParts: the per-engine objects a model hands to the layers it builds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.distributed import TPGroup
from labkit.layers.switches import KernelSwitches

if TYPE_CHECKING:  # the kernels import triton: only CUDA engines load them
    from labkit.kernels.gemv import GemvWorkspace


@dataclass(frozen=True)
class ModelParts:
    """What an engine hands to every layer it builds: its TP group, kernel switches and (on
    CUDA) the gemv kernel's split-K workspace."""

    tp: TPGroup
    switches: KernelSwitches
    workspace: GemvWorkspace | None = None

    def linear_args(self) -> dict:
        """The keyword arguments every parallel linear layer takes."""
        return {"tp": self.tp, "switches": self.switches, "workspace": self.workspace}
