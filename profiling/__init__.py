"""Benchmarks and profiling helpers (``profiling/bench_*.py``)."""
