"""Benchmarks: scripts that print numbers (python -m msgfm.bench.data, python -m msgfm.bench.train)."""
