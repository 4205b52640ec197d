"""vLLM's benchmark suite, as `labkit bench NAME` and as Python functions.

Each module is one benchmark with `add_args(parser)` for its CLI flags (vLLM's
names) and `run(**kwargs) -> dict` returning the result JSON; the offline ones take `llm=` to
reuse a loaded engine, or engine kwargs to build (and close) their own:

    from labkit.bench import latency
    result = latency.run(model="/path/to/ckpt", batch_size=8, input_len=32, output_len=128)

May import: the package root (LLM, SamplingParams), entrypoints, the engine and below; never lab
or cli.
"""

from labkit.bench import (
    guided,
    hostile,
    latency,
    long_doc_qa,
    prefix_caching,
    prioritization,
    serve,
    serve_guided,
    throughput,
)

# CLI name -> module, in `labkit bench --help` order.
BENCHMARKS = {
    "latency": latency,
    "throughput": throughput,
    "serve": serve,
    "prefix-caching": prefix_caching,
    "long-doc-qa": long_doc_qa,
    "prioritization": prioritization,
    "hostile": hostile,
    "guided": guided,
    "serve-guided": serve_guided,
}
