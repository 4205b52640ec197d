"""`labkit serve`: load the engine, start its loop thread, run uvicorn, shut down cleanly.

Shutdown: the first SIGINT/SIGTERM stops new connections and new requests (503) and gives the
ones in flight DRAIN_TIMEOUT_S to finish; what is still running then ends with an error chunk.
A second signal ends them at once (a third exits without waiting). Then the engine shuts down
and its TP workers exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from labkit.engine.engine import LLMEngine
from labkit.engine.input_processor import load_tokenizer
from labkit.engine.resolved_config import ResolvedConfig
from labkit.entrypoints.server.app import build_app
from labkit.entrypoints.server.engine_loop import EngineLoop
from labkit.entrypoints.server.serving import OpenAIServing, ServingOptions
from labkit.observe.metrics import ServerMetrics

log = logging.getLogger("labkit.server")

DRAIN_TIMEOUT_S = 10.0


@dataclass
class ServerArgs:
    served_model_names: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    chat_template: str | None = None  # a file, or the template itself
    log_requests: bool = True
    uvicorn_log_level: str = "info"
    trust_request_chat_template: bool = False  # allow `chat_template` in request bodies


def load_chat_template(value: str | None) -> str | None:
    """As vLLM's --chat-template: a path to a file, or else the Jinja template itself."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:
        pass  # a long inline template can be too long a file name
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"chat_template: {value!r} is neither a readable file nor a Jinja template")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop):
        super().__init__(config)
        self.engine_loop = engine_loop
        self.num_signals = 0

    def handle_exit(self, sig: int, frame) -> None:
        # uvicorn's own version force-exits on a second SIGINT, cutting streams without their
        # error chunk; here the second signal ends them properly and only a third forces.
        self.num_signals += 1
        if self.num_signals <= 2:
            self.engine_loop.begin_drain(DRAIN_TIMEOUT_S if self.num_signals == 1 else 0.0)
            self.should_exit = True
        else:
            self.force_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own version re-raises the signal once it has shut down, which kills the
        # process (SIGTERM) or unwinds it with a KeyboardInterrupt (SIGINT) before the engine
        # is shut down; here run() just returns.
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def serve(config: ResolvedConfig, args: ServerArgs) -> None:
    chat_template = load_chat_template(args.chat_template)
    engine_loop = EngineLoop(LLMEngine(config), ServerMetrics(args.served_model_names[0]))
    serving = None
    try:
        engine_loop.start()
        serving = OpenAIServing(
            engine_loop,
            load_tokenizer(config),
            ServingOptions(
                args.served_model_names,
                str(config.tokenizer_dir),
                config.max_model_len,
                engine_loop.engine.limits,
                chat_template,
                args.log_requests,
                args.trust_request_chat_template,
            ),
        )
        log.info(
            "serving %s; its tokenizer loads from %s (the models' `root`)",
            ", ".join(args.served_model_names),
            config.tokenizer_dir,
        )
        app = build_app(serving, engine_loop.metrics, args.api_key)
        server = _Server(
            uvicorn.Config(
                app,
                host=args.host,
                port=args.port,
                lifespan="off",
                log_level=args.uvicorn_log_level,
                timeout_graceful_shutdown=int(DRAIN_TIMEOUT_S) + 5,
            ),
            engine_loop,
        )
        server.run()
    finally:
        engine_loop.stop()
        if serving is not None:
            serving.close()
        log.info("labkit server stopped")
