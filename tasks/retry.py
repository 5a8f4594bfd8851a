"""Retries of the tasks that talk to servers, and the message a flow ends with when a server stays away.

Which failures a retry can fix is `vlmops.outages.is_transient` (one classifier for every task):

    @task(retries=SERVICE_RETRIES, retry_delay_seconds=SERVICE_BACKOFF, retry_condition_fn=transient)

The waits between tries are the tasks' own (a few seconds for a server, longer for a hub); VLMOPS_RETRY_DELAY_S
(vlmops.outages.retry_delay_setting), read when the tasks are imported, replaces each with that many seconds (e.g. 1 on
a test machine, where the outages are staged and a retry need not wait for a server to come back).

When the retries are spent, `names_unreachable_service` (around a flow) turns the last error into a
`ServiceUnavailable` that says which service (S3, MLflow, the Prefect API, a DVC remote) at which URL did not answer,
and what to run once it is back: the flow's own advice, which says what that reuses (a retry of the flow run,
`prefect flow-run retry ID`, reuses its finished steps: retrain's training and eval predictions, promote's eval
predictions; a new retrain run reuses only its download and validation, a new promote run nothing). When the Prefect
API is the one that did not answer, the flow run's end cannot be recorded either, so Prefect keeps showing it Running,
and `prefect flow-run retry` refuses a run that is not over. On a server that marks such a run Crashed once its
heartbeats stop (the team stack's automation; its workers' environment says after how long: VLMOPS_CRASHED_AFTER_S), a
deployment's run gets the retry advice, to follow once Prefect shows the run Crashed; elsewhere (the embedded default,
a `vlmops run` of no deployment) the advice is a new run.
"""

from __future__ import annotations

import functools
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect.tasks import exponential_backoff

from vlmops.outages import (
    DISK_FULL_ERRNOS,
    PREFECT_API,
    ServiceUnavailable,
    exception_chain,
    is_transient,
    retry_delay_setting,
    unreachable_service,
)

F = TypeVar("F", bound=Callable[..., Any])


def retry_delays(*seconds: float) -> list[float]:
    """The waits before each retry of a task: `seconds`, or VLMOPS_RETRY_DELAY_S for each where it is set.

    Read when the tasks are imported. A value that is no number of seconds leaves `seconds` here: it is refused where a
    run starts (the command line; a flow run or a task worker, through flows.SETTINGS_ERROR, before any step), with one
    message. Raised here, it failed the flows' import, whose traceback Prefect prints three times on a worker."""
    try:
        delay = retry_delay_setting()
    except ValueError:
        return list(seconds)
    return list(seconds) if delay is None else [delay] * len(seconds)


# Two retries, 5 s then 10 s apart (Prefect adds no jitter unless asked): long enough for a restarting server
# or a network blip, short enough that a real outage is reported within a minute.
SERVICE_RETRIES = 2
SERVICE_BACKOFF = retry_delays(*exponential_backoff(backoff_factor=5)(SERVICE_RETRIES))


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed task run only for a transient failure."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def another_try_could_pass(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` of a GPU task (a batch job's shard): retry any failure but the input's own (a
    `UserInputError`: a reject under `on_error: fail`, a model that is not the job's) and a full disk. A worker that
    lost its GPU or its connection may do better on the next try; a bad record fails the same way each time, after
    answering the shard up to it again."""
    from vlmops.errors import UserInputError

    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if not isinstance(exc, BaseException) or isinstance(exc, UserInputError):
        return False
    return not any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in exception_chain(exc))


NOT_RUN_AGAIN = (
    "Prefect may still show flow run {id} Running (its end could not be recorded while the API was away), and "
    "`prefect flow-run retry` refuses a run that is not over"
)

RETRY_ONCE_CRASHED = (
    "Prefect accepts the retry once it shows the run Crashed: the server marks a run Crashed {s} s after its last "
    "heartbeat"
)

CRASHED_AFTER_ENV = "VLMOPS_CRASHED_AFTER_S"


def crashed_after_s() -> int | None:
    """How long the Prefect server lets a Running flow run go without a heartbeat before it marks the run Crashed
    (VLMOPS_CRASHED_AFTER_S, which the team stack sets beside its automation); None: unset, no such automation."""
    setting = os.environ.get(CRASHED_AFTER_ENV, "").strip()
    if not setting:
        return None
    if not setting.isdigit() or int(setting) == 0:
        raise ValueError(
            f"{CRASHED_AFTER_ENV}={setting!r}: must be a whole number of seconds, above 0 (unset: no automation)"
        )
    return int(setting)


# Read when the flows import this module, as the retry delays are: a bad value stops the flow run at its start, not in
# the middle of reporting an outage.
CRASHED_AFTER_S = crashed_after_s()


def names_unreachable_service(then: Callable[[], str], new_run: str | None = None) -> Callable[[F], F]:
    """Around a flow function: a failure that `unreachable_service` recognises is raised again as
    `ServiceUnavailable` (from the original), so the run ends saying which server to bring back and what to run then.

    Args:
        then: what to run once the server is back, and what that reuses; called when the error is raised, in the flow
            run (it may name the flow run's id: `retry_this_flow_run`).
        new_run: what to run instead when the server is the Prefect API, and what that reuses: a new flow run (the
            engine cannot record this one's end either: `NOT_RUN_AGAIN`). A deployment's run on a server that marks
            runs whose heartbeats stopped Crashed (`CRASHED_AFTER_S`) gets `then` instead, with when a retry is
            accepted (`RETRY_ONCE_CRASHED`). None: `then`, whichever server it is.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if any(isinstance(e, ServiceUnavailable) and e.then for e in exception_chain(err)):
                    raise  # named already, by a flow this one ran (retrain's promote, or the failure that carries it)
                outage = unreachable_service(err)  # a client's error, or an outage the core named without advice
                if outage is None:
                    raise
                if new_run is not None and outage.service == PREFECT_API:
                    from prefect.runtime import flow_run

                    if CRASHED_AFTER_S is None or not _of_a_deployment():
                        raise ServiceUnavailable(outage, f"{new_run}. {NOT_RUN_AGAIN.format(id=flow_run.id)}") from err
                    # The server marks this run Crashed once its heartbeats have stopped that long (its worker reports
                    # it sooner where it reaches the API), and a retry is accepted from then on.
                    raise ServiceUnavailable(
                        outage, f"{then()}. {RETRY_ONCE_CRASHED.format(s=CRASHED_AFTER_S)}"
                    ) from err
                raise ServiceUnavailable(outage, then()) from err

        return wrapper  # type: ignore[return-value]

    return decorate


def retry_this_flow_run(flow_file: str, flow_name: str) -> str:
    """How to retry the running flow run: `prefect flow-run retry ID`; for a run of no deployment (`vlmops run`, which
    no worker picks up), with the flow's entrypoint, which Prefect then runs in the shell that gives the command."""
    from prefect.runtime import flow_run

    command = f"prefect flow-run retry {flow_run.id}"
    if _of_a_deployment():
        return f"`{command}`"
    entrypoint = shlex.quote(f"{Path(flow_file).resolve()}:{flow_name}")
    return (
        f"`{command} --entrypoint {entrypoint}` in the folder it started in (its parameters' paths are read from there)"
    )


def _of_a_deployment() -> bool:
    """Whether the running flow run is a deployment's, from the run the engine holds: `prefect.runtime.deployment.id`
    asks the API about a run of no deployment, which an error path must not (with the API away, its ConnectError took
    the outage's place)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context is not None and context.flow_run is not None and context.flow_run.deployment_id is not None
