"""labkit: an LLM-inference engine and experiment kit with vLLM's API."""
from labkit.config import EngineConfig
from labkit.entrypoints.llm import LLM
from labkit.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from labkit.entrypoints.beam_search import BeamSearchOutput, BeamSearchSequence
from labkit.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "RequestOutputKind", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestMetrics", "__version__"]
