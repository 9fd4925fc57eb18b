"""Benchmarks: `python -m vemscale.bench.<stage>` prints a small table of throughput numbers."""
