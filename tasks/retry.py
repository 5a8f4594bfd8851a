"""Which failures a retry can fix: the network, a server's 5xx, throttling. One classifier for every task.

A retry is worth it only when the same call can succeed a moment later. An unknown model id, a corrupt
snapshot, a bad config or a full disk fail the same way every time: retrying them only delays the error
(and, for a step that is not idempotent, repeats its side effects).

    @task(retries=2, retry_delay_seconds=30, retry_condition_fn=transient)
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

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
    model id answered 404, an image that is not there), and its own I/O retries have already run.
    """
    from vlmops.errors import UserInputError

    if isinstance(exc, UserInputError):
        return False
    chain = list(_chain(exc))
    if any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in chain):
        return False
    return any(_transient_alone(e) for e in chain)


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed task run only for a transient failure."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


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
