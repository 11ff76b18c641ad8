"""Benchmarks: each starts its own stack, prints progress and ends with one line of JSON."""
