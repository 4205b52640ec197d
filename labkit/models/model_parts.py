"""ModelParts: the per-engine objects a model hands to the layers it builds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.distributed import TPGroup
from labkit.layers.quantization.scheme import Fp8Scheme
from labkit.layers.switches import KernelSwitches

if TYPE_CHECKING:  # the kernels import triton: only CUDA engines load them
    from labkit.kernels.gemv import GemvWorkspace


@dataclass(frozen=True)
class ModelParts:
    """What an engine hands to every layer it builds: its TP group, kernel switches, (on CUDA)
    the gemv kernel's split-K workspace, and the FP8 scheme of its quantized linear layers."""

    tp: TPGroup
    switches: KernelSwitches
    workspace: GemvWorkspace | None = None
    quant: Fp8Scheme | None = None

    def linear_args(self, quantized: bool = True) -> dict:
        """The keyword arguments every parallel linear layer takes; `quantized`: with the
        engine's FP8 scheme (the attention and MLP projections, not the LM head)."""
        args = {"tp": self.tp, "switches": self.switches, "workspace": self.workspace}
        return {**args, "quant": self.quant} if quantized else args
