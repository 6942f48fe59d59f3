"""Benchmarks: `python -m benchmarks` (runner) and pytest-benchmark tests (`pytest benchmarks -m gpu`)."""
