"""Prefect tasks: one module per pipeline step, each a thin wrapper around a `vlmops` function."""
