"""The lab: experiments on top of the engine and the benchmarks, for JupyterLab.

  sweeps     labkit.sweep() / labkit.load_sweep(): benchmark points into one DataFrame
  charts     plotly figures of sweeps, and the live chart that fills in as points finish
  roofline   this machine's ceilings (measured once, cached) and a batch's floor time
  profiling  labkit.profile(): step timeline and time by operator category
  widgets    labkit.dashboard(): the sweep behind ipywidgets controls
  env        where a result came from (device, versions, git commit)

`import labkit` does not import this package; plotly and ipywidgets load on first use.
May import: bench, the package root and everything below; never cli.
"""
