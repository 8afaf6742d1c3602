"""Tools that serve the command lines (benchmarks, downloading, building datasets); lib/ is the core the notebooks read."""
