"""Benchmarks; each writes its section of BENCHMARKS.md (see bench/report.py)."""
