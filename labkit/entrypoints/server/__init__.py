"""`labkit serve`: an OpenAI-compatible HTTP server over one engine loop (vLLM's `vllm serve`).

Layers, each importing only those below it: errors, protocol -> engine_loop -> formats ->
serving -> app -> api_server.
"""

from labkit.entrypoints.server.api_server import ServerArgs, serve

__all__ = ["ServerArgs", "serve"]
