"""Which failures a retry can fix: the network, a server's 5xx, throttling, a download that arrived damaged. One
classifier for every task.

A retry is worth it only when the same call can succeed a moment later. An unknown model id, a corrupt
snapshot, a bad config or a full disk fail the same way every time: retrying them only delays the error
(and, for a step that is not idempotent, repeats its side effects).

    @task(retries=SERVICE_RETRIES, retry_delay_seconds=SERVICE_BACKOFF, retry_condition_fn=transient)

The waits between tries are the tasks' own (a few seconds for a server, longer for a hub); VLMOPS_RETRY_DELAY_S,
read when the tasks are imported, replaces each with that many seconds (e.g. 1 on a test machine, where the outages
are staged and a retry need not wait for a server to come back).

When the retries are spent, `names_unreachable_service` (around a flow) turns the last error into a
`ServiceUnavailable` that says which service (S3, MLflow, Prefect) at which URL did not answer, and what to run once it
is back: the flow's own advice, which says what that reuses (a retry of the flow run, `prefect flow-run retry ID`,
reuses its finished steps: retrain's training and eval predictions, promote's eval predictions; a new retrain run
reuses only its download and validation, a new promote run nothing).
"""

from __future__ import annotations

import errno
import functools
import math
import os
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prefect.tasks import exponential_backoff

from vlmops.errors import RunFailed
from vlmops.redact import redact_uri

F = TypeVar("F", bound=Callable[..., Any])

RETRY_DELAY_ENV = "VLMOPS_RETRY_DELAY_S"


def retry_delays(*seconds: float) -> list[float]:
    """The waits before each retry of a task: `seconds`, or VLMOPS_RETRY_DELAY_S for each where it is set."""
    setting = os.environ.get(RETRY_DELAY_ENV, "").strip()
    if not setting:
        return list(seconds)
    try:
        delay = float(setting)
    except ValueError:
        delay = math.nan
    if not 0 <= delay < math.inf:  # not a number, negative, NaN or infinite
        raise ValueError(f"{RETRY_DELAY_ENV}={setting!r}: must be a number of seconds, 0 or more (unset: the defaults)")
    return [delay] * len(seconds)


# Two retries, 5 s then 10 s apart (Prefect adds no jitter unless asked): long enough for a restarting server
# or a network blip, short enough that a real outage is reported within a minute.
SERVICE_RETRIES = 2
SERVICE_BACKOFF = retry_delays(*exponential_backoff(backoff_factor=5)(SERVICE_RETRIES))

# Error codes S3 (and S3-compatible servers) answer when they want the client to slow down or come back.
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "SlowDown",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
    }
)
# MLflow REST error codes that mean "not now" rather than "never".
MLFLOW_TRANSIENT_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
# Out of space: retrying fills the disk again.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is one a retry can fix.

    A `UserInputError` never is, whatever it was raised from: the library judged the input wrong (an unknown
    model id answered 404, an image that is not there), and its own I/O retries have already run. Nor is a lock that
    another process held past this one's wait (an hour for a download): another try only waits as long again.
    """
    from vlmops.errors import UserInputError
    from vlmops.staging import LockTimeoutError

    if isinstance(exc, (UserInputError, LockTimeoutError)):
        return False
    chain = list(_chain(exc))
    if any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in chain):
        return False
    return any(_transient_alone(e) for e in chain)


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
    return not any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _transient_alone(exc: BaseException) -> bool:
    import botocore.exceptions as botocore
    import requests
    import urllib3.exceptions as urllib3
    from mlflow.exceptions import RestException

    from vlmops.storage import CorruptedDownloadError

    if isinstance(exc, CorruptedDownloadError):  # bytes damaged on the way: the next copy is likely whole
        return True
    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and _retryable_status(exc.response.status_code)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    if isinstance(exc, (urllib3.ProtocolError, urllib3.TimeoutError, urllib3.NewConnectionError)):
        return True
    if isinstance(exc, urllib3.MaxRetryError):  # urllib3 gave up on a connection or a retryable status
        return exc.reason is None or _transient_alone(exc.reason) or isinstance(exc.reason, urllib3.ResponseError)
    if isinstance(exc, botocore.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return error.get("Code") in THROTTLING_CODES or (status is not None and _retryable_status(int(status)))
    if isinstance(exc, (botocore.ConnectionError, botocore.HTTPClientError)):
        return True  # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError
    if isinstance(exc, RestException):  # the tracking server answered with an error
        return exc.error_code in MLFLOW_TRANSIENT_CODES or _retryable_status(exc.get_http_status_code())
    # The standard library's own network errors (socket resets, refused connections, timeouts).
    return isinstance(exc, (ConnectionError, TimeoutError))


def _retryable_status(status: int) -> bool:
    return status >= 500 or status == 429


class ServiceUnavailable(RunFailed):
    """A server the pipeline needs did not answer, after the retries; names it and its URL, and what to run when it is
    back (`then`: what the flow that failed reuses, see `names_unreachable_service`)."""

    def __init__(self, service: str, url: str, cause: BaseException, then: str = "run again"):
        self.service = service
        self.url = url
        super().__init__(
            f"{service} at {url} did not answer, after retries: {type(cause).__name__}: "
            f"{redact_uri(str(cause))[:500]}\nstart it (or fix its URL in the config), then {then}"
        )


_URL = re.compile(r"https?://[^\s'\"<>)]+")


def unreachable_service(exc: BaseException) -> tuple[str, str] | None:
    """(service, base URL) of the server a transient failure could not reach, read off the exception chain;
    None when `exc` is not transient or names no server."""
    if not is_transient(exc):
        return None
    import botocore.exceptions as botocore
    import requests
    import urllib3.exceptions as urllib3

    # The request that failed first (the URL it asked for says which service); a URL in a message only where no
    # request is in the chain: a message may name a server with no path (vlmops' "not found in the registry at
    # http://host:5000"), which says nothing of which service it is.
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, botocore.BotoCoreError) and "endpoint_url" in getattr(e, "kwargs", {}):
            return "S3", _base(str(e.kwargs["endpoint_url"]))
        if isinstance(e, requests.RequestException) and e.request is not None and e.request.url:
            return _service_of(e.request.url), _base(e.request.url)
        if isinstance(e, urllib3.MaxRetryError) and e.pool is not None:
            url = f"{e.pool.scheme}://{e.pool.host}:{e.pool.port}{e.url or ''}"
            return _service_of(url), _base(url)
    for e in chain:
        if (found := _URL.search(str(e))) is not None:
            return _service_of(found.group(0)), _base(found.group(0))
    return None


def names_unreachable_service(then: Callable[[], str]) -> Callable[[F], F]:
    """Around a flow function: a failure that `unreachable_service` recognises is raised again as
    `ServiceUnavailable` (from the original), so the run ends saying which server to bring back and what to run then.

    Args:
        then: what to run once the server is back, and what that reuses; called when the error is raised, in the flow
            run (it may name the flow run's id: `retry_this_flow_run`).
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if any(isinstance(e, ServiceUnavailable) for e in _chain(err)):
                    raise  # named already, by a flow this one ran (retrain's promote, or the failure that carries it)
                outage = unreachable_service(err)
                if outage is None:
                    raise
                raise ServiceUnavailable(*outage, err, then()) from err

        return wrapper  # type: ignore[return-value]

    return decorate


def retry_this_flow_run(flow_file: str, flow_name: str) -> str:
    """How to retry the running flow run: `prefect flow-run retry ID`; for a run of no deployment (`vlmops run`, which
    no worker picks up), with the flow's entrypoint, which Prefect then runs in the shell that gives the command."""
    from prefect.runtime import deployment, flow_run

    command = f"prefect flow-run retry {flow_run.id}"
    if deployment.id:
        return f"`{command}`"
    entrypoint = shlex.quote(f"{Path(flow_file).resolve()}:{flow_name}")
    return (
        f"`{command} --entrypoint {entrypoint}` in the folder it started in (its parameters' paths are read from there)"
    )


def _service_of(url: str) -> str:
    if "/mlflow" in url or "/ajax-api/" in url or "mlflow-artifacts" in url:
        return "MLflow"
    if "/api/" in url and ("flow_runs" in url or "task_runs" in url or "prefect" in url):
        return "Prefect"
    return "the server"


def _base(url: str) -> str:
    match = re.match(r"[a-z][a-z0-9+.-]*://[^/?#]+", url)
    return redact_uri(match.group(0) if match else url)
