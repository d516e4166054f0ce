"""Studies: grids of configurations and seeds (hyper, runner), and reading them (report, compare)."""
