"""Benchmarks and fault runs; each module runs as ``python -m bench.NAME``."""
