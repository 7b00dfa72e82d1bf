"""Benchmarks: the toolkit measured next to the raw floor in one run (see README)."""
