"""Observability: what a run records about itself, and how its time is attributed.

  step_log     StepRecord, one per engine step, and the step log as a DataFrame
  timer        PhaseTimer: per-phase step times (CUDA events for device phases), profiler ranges
  metrics      the server's Prometheus metrics (/metrics)
  trace        trace_region: the benchmarks' `--profile` trace and operator table
  labels       label_layers(model): a profiler range per layer call by its `profile_category`
  attribution  a Chrome trace -> self time per operator, category and prefill/decode step
  profiler     profiling(...): capture a region's trace and step rows into a Profile

This package sits near the bottom of labkit: the engine, the benchmarks and the lab use it, so
it imports only the standard library, torch and numpy/pandas, and of labkit only labkit.utils;
what it needs of an engine (its layer labels, its step log) is passed in.
May import: the foundation modules (config, sampling_params, outputs, utils, ...) only.
"""
