"""Benchmark harness: speedup and τ against a baseline measured in the same run."""
