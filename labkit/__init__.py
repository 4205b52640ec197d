"""labkit: an LLM-inference engine and experiment kit with vLLM's API.

The package root holds the public names (LLM, SamplingParams, ...; the lab's sweep, dashboard
and profile load on first use). The house, top floor first; a module imports only from its own
floor or lower ones (tests/unit/test_layering.py reads every import to check it):

  cli -> lab -> bench -> labkit (this root) -> entrypoints -> engine -> models -> layers ->
  distributed -> kernels -> observe -> foundation (config, sampling_params, outputs,
  default_model, transfer, utils, version)

May import: entrypoints and everything below them; never bench, lab or cli (the lab's names
load lazily, through __getattr__).
"""

from labkit.config import EngineConfig
from labkit.entrypoints.beam_search import BeamSearchOutput, BeamSearchSequence
from labkit.entrypoints.llm import LLM
from labkit.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from labkit.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from labkit.structured_params import GuidedDecodingParams, StructuredOutputsParams
from labkit.version import __version__

__all__ = [
    "LLM",
    "SamplingParams",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "RequestOutputKind",
    "StructuredOutputsParams",
    "GuidedDecodingParams",
    "EngineConfig",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "RequestMetrics",
    "sweep",
    "load_sweep",
    "last_sweep",
    "serving_sweep",
    "dashboard",
    "profile",
    "__version__",
]

# The lab loads on first use, so `import labkit` does not import plotly or ipywidgets.
_LAB = {
    "sweep": "labkit.lab.sweeps",
    "load_sweep": "labkit.lab.sweeps",
    "last_sweep": "labkit.lab.sweeps",
    "serving_sweep": "labkit.lab.serving",
    "dashboard": "labkit.lab.widgets",
    "profile": "labkit.lab.profiling",
}


def __getattr__(name: str):
    if name in _LAB:
        import importlib

        return getattr(importlib.import_module(_LAB[name]), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
