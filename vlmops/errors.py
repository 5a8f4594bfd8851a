"""The error types the `vlmops` command maps to exit codes (vlmops.cli.main is the one place that does).

Library code raises these (or subclasses); it never prints and never picks an exit code.

- `UserInputError` (exit 2): something the user gave is wrong (a config key, a dataset record, a path, a
  model id); the message says what, where and how to fix it.
- `RunFailed` (exit 1): the input was fine but the work failed (a training process died, a parity check
  failed, a download broke off); the message says what failed and where its log is.
"""

from __future__ import annotations


class VlmopsError(Exception):
    """Base of the errors `vlmops` reports as one message instead of a traceback."""

    exit_code = 1


class UserInputError(VlmopsError, ValueError):
    """Bad user input (config, data, paths, names): exit code 2."""

    exit_code = 2


class RunFailed(VlmopsError, RuntimeError):  # noqa: N818 (reads as "the run failed")
    """A step failed on valid input: exit code 1."""

    exit_code = 1
