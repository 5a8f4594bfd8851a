"""The `vlmops` command: one module per subcommand, each a thin layer of argument parsing and printing
over the library. `main` is the one place that turns library errors into messages and exit codes."""

from vlmops.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
