"""Benchmarks of the parameter server, each runnable as ``python -m benchmarks.<name>``."""
