"""Benchmark scripts: each runs on its own with `python -m bench.<name>` and prints a table."""
