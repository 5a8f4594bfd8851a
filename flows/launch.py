"""What a command that launches a flow (`vlmops run`, `vlmops promote`) sets up around it."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr

from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

EPHEMERAL_STARTUP_TIMEOUT_S = 300
DRAIN_TIMEOUT_S = 90
"""How long a failed command waits for Prefect's senders: with the API away, its client's five retries of a batch take
about a minute (PREFECT_CLIENT_MAX_RETRIES)."""


@contextmanager
def patient_ephemeral_server() -> Iterator[None]:
    """Wait up to EPHEMERAL_STARTUP_TIMEOUT_S for Prefect's temporary server (a larger user setting is kept).

    Prefect gives up after 20 s by default. Two commands started together on one PREFECT_HOME each start one,
    and the second waits on the first's database migrations (SQLite takes one writer): on a loaded two-core
    machine that took longer, and the run failed before its flow began (tests/test_concurrent_runs.py).
    """
    timeout = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), EPHEMERAL_STARTUP_TIMEOUT_S)
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: timeout}):
        yield


@contextmanager
def errors_after_prefect_reports() -> Iterator[None]:
    """A failed flow's error reaches the command (which prints it) once Prefect's background senders have sent the flow
    run's logs and events to its API, or given up (within DRAIN_TIMEOUT_S).

    They would finish at exit otherwise, after the command's error: with the API away mid-run, Prefect's
    "--- Error logging to API ---" lines were the command's last words, below the one that names the outage. What they
    write to stderr themselves is passed on whole, ended with a newline (Prefect's lacks it), so the error starts a line.
    """
    try:
        yield
    except Exception:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        written = io.StringIO()
        with redirect_stderr(written):
            for sender in (APILogWorker, EventsWorker):
                sender.drain_all(timeout=DRAIN_TIMEOUT_S)
        if text := written.getvalue():
            sys.stderr.write(text if text.endswith("\n") else f"{text}\n")
        raise
