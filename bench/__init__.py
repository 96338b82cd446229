"""Benchmarks against baselines in the same process: `python -m bench.NAME --help` from the
repository root (docs/performance.md)."""
