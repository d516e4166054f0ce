"""Stand-alone speed measurements; each module runs with `python -m`."""
