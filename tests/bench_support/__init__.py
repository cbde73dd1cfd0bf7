"""Helpers of the benchmark (tests/bench.py): process accounting, load
clients, profiling. Not collected by pytest."""
