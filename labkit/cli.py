"""The `labkit` command: generate, serve, bench, sweep. The top of the house: it may import any
part of labkit, and nothing imports it. Engine flags come from EngineConfig's fields."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from labkit.config import EngineConfig, add_engine_args, engine_kwargs
from labkit.version import __version__


def cmd_generate(args: argparse.Namespace) -> int:
    from labkit import LLM, SamplingParams

    sp = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
        n=args.n,
    )
    with LLM(**engine_kwargs(args)) as llm:
        prompts = args.prompts
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], sp, use_tqdm=False)
        else:
            outs = llm.generate(prompts, sp, use_tqdm=False)
        # The user's prompt, not the chat template's rendering of it.
        for prompt, out in zip(prompts, outs):
            for c in out.outputs:
                print(f"Prompt: {prompt!r}, Generated text: {c.text!r}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from labkit.default_model import DEFAULT_MODEL_NAME
    from labkit.engine.resolved_config import resolve
    from labkit.entrypoints.server import ServerArgs, serve

    kwargs = engine_kwargs(args)
    kwargs["model"] = args.model_tag or args.model
    names = args.served_model_name or [kwargs["model"] or DEFAULT_MODEL_NAME]
    serve(
        resolve(EngineConfig(**kwargs)),
        ServerArgs(
            names,
            args.host,
            args.port,
            args.api_key,
            args.chat_template,
            not args.disable_log_requests,
            args.uvicorn_log_level,
            args.trust_request_chat_template,
        ),
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    kwargs = {
        k: v for k, v in vars(args).items() if k not in ("command", "benchmark", "func", "bench")
    }
    print(json.dumps(args.bench.run(**kwargs), indent=4))
    return 0


def add_bench_parser(sub) -> None:
    """`labkit bench NAME`: one subcommand per labkit.bench module (flags from its add_args)."""
    from labkit.bench import BENCHMARKS

    b = sub.add_parser("bench", help=f"vLLM's benchmarks: {', '.join(BENCHMARKS)}")
    names = b.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        p = names.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_args(p)
        p.set_defaults(func=cmd_bench, bench=module)


def cmd_sweep(args: argparse.Namespace) -> int:
    from labkit.lab import sweep_cli

    return sweep_cli.main(args, engine_kwargs(args))


def add_sweep_parser(sub) -> None:
    """`labkit sweep`: labkit.sweep() over a grid; writes the DataFrame and an HTML report."""
    from labkit.lab import sweep_cli

    p = sub.add_parser(
        "sweep",
        help="benchmark a grid of batch sizes and lengths (DataFrame + HTML report)",
        conflict_handler="resolve",
    )
    sweep_cli.add_args(p)
    p.set_defaults(func=cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions for prompts")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    g.add_argument("--max-tokens", type=int, default=32, dest="max_tokens")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0, dest="top_p")
    g.add_argument("--top-k", type=int, default=0, dest="top_k")
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--sampling-seed", type=int, default=None, dest="sampling_seed")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    s.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="a Hugging Face repo id or a local checkpoint dir or .gguf (default: "
        "SmolLM2-135M-Instruct)",
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        default=os.environ.get("LABKIT_API_KEY"),
        dest="api_key",
        help="require `Authorization: Bearer KEY` on /v1/* (default: $LABKIT_API_KEY)",
    )
    s.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        dest="served_model_name",
        help="name(s) clients use for the model (default: the MODEL argument)",
    )
    s.add_argument(
        "--chat-template",
        default=None,
        dest="chat_template",
        help="a Jinja chat template, or a file holding one (default: the tokenizer's)",
    )
    s.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        dest="trust_request_chat_template",
        help="accept `chat_template` in request bodies (refused by default: a template "
        "is code the server runs)",
    )
    s.add_argument("--disable-log-requests", action="store_true", dest="disable_log_requests")
    s.add_argument(
        "--uvicorn-log-level",
        default="info",
        dest="uvicorn_log_level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)
    add_bench_parser(sub)
    add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"labkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
