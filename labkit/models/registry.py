from __future__ import annotations

from torch import nn

from labkit.models.llama import LlamaForCausalLM
from labkit.models.mixtral import MixtralForCausalLM
from labkit.models.qwen3 import Qwen3ForCausalLM
from labkit.models.qwen3_moe import Qwen3MoeForCausalLM

# Qwen2 is Llama with q/k/v biases (ModelConfig.attention_bias), so one class serves both.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported "
            f"architectures: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
