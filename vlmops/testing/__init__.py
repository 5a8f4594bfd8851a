"""Builders for tests and benchmarks (fake model releases); nothing a pipeline run uses."""
