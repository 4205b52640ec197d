"""The lab: experiments on top of the engine and the benchmarks, for JupyterLab.

  sweeps          labkit.sweep() / load_sweep() / last_sweep(): benchmark points into one
                  DataFrame, interrupt-safe, written point by point, resumable
  points          one point: run_point(group, llm, point) -> its row, raw timings, step log
  sweep_run       a sweep in progress: each finished point kept (result, file, live view)
  cluster         sweep(cluster=...): each engine group a Ray actor, side by side
  sweep_file      a sweep's file (JSON Lines, a line per point)
  sweep_cli       `labkit sweep`
  machine         the spread of a timing and the machine's state while it ran
  charts          plotly figures of sweeps
  profile_charts  a run's step timeline and a profile's operator categories
  report          a sweep as one offline HTML file
  live            a running sweep's status line and live chart (static once it ends)
  drilldown       result.point(i): a point's step timeline, operators and trace
  serving         labkit.serving_sweep(): request rate / concurrency against latency
  serving_charts  its figures: throughput vs latency, CDFs, goodput
  server_process  `labkit serve` as a child process (the serving sweep's server)
  roofline        this machine's ceilings (measured once, cached) and a batch's floor time
  profiling       labkit.profile(): step timeline and time by operator category
  widgets         labkit.dashboard(): the sweep behind ipywidgets controls
  env             where a result came from (device, versions, git commit)

`import labkit` does not import this package; plotly and ipywidgets load on first use.
May import: bench, the package root and everything below; never cli.
"""
