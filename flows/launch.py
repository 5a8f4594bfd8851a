"""What a command that launches a flow (`vlmops run`, `vlmops promote`) sets up around it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

EPHEMERAL_STARTUP_TIMEOUT_S = 300


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
