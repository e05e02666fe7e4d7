"""The benchmark suite: `python -m benchmarks` runs it all (see __main__.py)."""
