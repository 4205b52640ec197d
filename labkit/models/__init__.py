"""Model definitions (one file per architecture family), the registry from a checkpoint's
`architectures` to our classes, ModelConfig (config.json as a dataclass), and loading: local
checkpoints (safetensors, GGUF, dummy weights) and Hub names (hub.py).

May import: layers, distributed, kernels, observe and the foundation modules; never the engine
or anything above it.
"""
