"""The engine: one step of serving, and the requests that flow through it.

  engine           LLMEngine, the core: add_request / step / abort_request, async scheduling,
                   one StepRecord per step; stats() and step_records() for its neighbours
  input_processor  prompts and SamplingParams -> Requests (tokenize, check limits and prompt)
  output_processor sampled tokens -> text, logprobs, stop checks, RequestOutputs
  scheduler        continuous batching, chunked prefill, preemption, priorities
  block_manager    paged KV blocks, block tables, the prefix cache
  model_runner     a step's batch tensors, the forward pass, CUDA graphs (cuda_graphs)
  sampler          logits -> tokens and logprobs, penalties and controls
  warmup           the start-up warm-up: every kind of step run once, so nothing compiles
                   or loads lazily during the first run
  executor         where tensor-parallel ranks 1..N-1 run: child processes ("mp", tp_worker
                   is their entry point) or Ray actors ("ray")
  request, detokenizer, stats, resolved_config (the options with every "auto" settled)

May import: models, layers, distributed, kernels, observe and the foundation modules; never
entrypoints, bench, lab or cli.
"""
