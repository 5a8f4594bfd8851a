"""Which failures are a service's outage: the network, a server's 5xx, throttling, a download that arrived damaged
(`is_transient`: a retry may fix them), and which server did not answer (`unreachable_service`).

A retry is worth it only when the same call can succeed a moment later. An unknown model id, a corrupt
snapshot, a bad config or a full disk fail the same way every time: retrying them only delays the error
(and, for a step that is not idempotent, repeats its side effects).

`ServiceUnavailable` is the error that names the server (S3, MLflow, the Prefect API, a DVC remote) and its URL, and
says what to run once it is back. Who raises it gives that advice: a flow (tasks.retry.names_unreachable_service) or a
command (`vlmops batch-infer`; for any other, `vlmops` itself: vlmops.cli.main). No Prefect here: the command and the
flows share it; the Prefect API is known by its client's requests (httpx, a plain library, with Prefect's user agent).
Core code that knows better than the client's error which service it talked to (vlmops.versioning: the DVC remote,
whose push and pull report only a count of failed files) raises a `ServiceUnavailable` without advice, which the
command or flow around it names again with its own. So does a child process (a batch job's worker, the
`vlmops batch-infer` a flow runs), in its last lines, which the error its parent raises quotes: `unreachable_service`
reads the outage back off them. A `vlmops` command run so gives no advice of its own (`PARENT_ADVISES_ENV`).
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlmops.errors import RunFailed
from vlmops.redact import redact_uri

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
    chain = list(exception_chain(exc))
    if any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in chain):
        return False
    return any(_transient_alone(e) for e in chain)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then the exception it was raised from (or while handling), and so on; each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _transient_alone(exc: BaseException) -> bool:
    import botocore.exceptions as botocore
    import httpx
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
    if isinstance(exc, httpx.HTTPStatusError):  # the Prefect API's client (PrefectHTTPStatusError too)
        return _retryable_status(exc.response.status_code)
    # A refused or cut connection, a timeout, a server gone before it answered; not a bad URL (UnsupportedProtocol).
    if isinstance(exc, (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ProxyError)):
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


@dataclass(frozen=True)
class Outage:
    """A server that did not answer: which service, its base URL, and the last error (`Type: message`)."""

    service: str
    url: str
    error: str

    def __str__(self) -> str:
        return f"{self.service} at {self.url} {_DID_NOT_ANSWER}{self.error}"


# Not "after retries": whether the client retried is its own setting (AWS_MAX_ATTEMPTS, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
# PREFECT_CLIENT_MAX_RETRIES; Prefect's client retries a refused connection only once it has connected before),
# unknown here.
_DID_NOT_ANSWER = "did not answer: "
PREFECT_API = "Prefect API"
DVC_REMOTE = "DVC remote"
# An outage as `Outage.__str__` writes it, wherever it stands in a line: after `error: ` (a vlmops command's last
# words), after a traceback's exception type, indented in an error that quotes a child's last lines.
_REPORTED = re.compile(
    rf"\b(S3|MLflow|{PREFECT_API}|{DVC_REMOTE}|the server) at (\S+) {re.escape(_DID_NOT_ANSWER)}([^\n]*)"
)


class ServiceUnavailable(RunFailed):
    """A server the pipeline needs did not answer (after its client's retries, if any); names it and its URL, and what
    to run when it is back (`then`: what that reuses; a flow's, see tasks.retry.names_unreachable_service, or a
    command's). None: the code that raises it does not know what a person ran (a batch job's worker,
    vlmops.versioning); the command or flow around it names the outage again (`unreachable_service`), from the error
    or from the process's output, with its own advice."""

    def __init__(self, outage: Outage, then: str | None = None):
        self.outage = outage
        self.service = outage.service
        self.url = outage.url
        self.then = then
        advice = f"\nstart it (or {_fix_its_url(outage)}), then {then}" if then else ""
        super().__init__(f"{outage}{advice}")


def _fix_its_url(outage: Outage) -> str:
    """Where the URL of the server that did not answer is set."""
    if outage.service == PREFECT_API:
        return "point PREFECT_API_URL at the server"
    if outage.service == DVC_REMOTE and outage.url.startswith("s3://"):
        # DVC's S3 client reads its endpoint from the environment, not from storage.endpoint_url.
        return "fix versioning.remote_url in the config, or the endpoint in AWS_ENDPOINT_URL"
    if outage.service == DVC_REMOTE:
        return "fix versioning.remote_url in the config"
    return "fix its URL in the config"


RETRY_DELAY_ENV = "VLMOPS_RETRY_DELAY_S"


def retry_delay_setting() -> float | None:
    """VLMOPS_RETRY_DELAY_S: the seconds that replace every wait between a task's tries (tasks.retry); None unset.

    Raises:
        ValueError: it is set to no number of seconds (not a number, negative, NaN or infinite), named with the fix.
    """
    setting = os.environ.get(RETRY_DELAY_ENV, "").strip()
    if not setting:
        return None
    try:
        delay = float(setting)
    except ValueError:
        delay = math.nan
    if not 0 <= delay < math.inf:
        raise ValueError(f"{RETRY_DELAY_ENV}={setting!r}: must be a number of seconds, 0 or more (unset: the defaults)")
    return delay


PARENT_ADVISES_ENV = "VLMOPS_PARENT_ADVISES"
"""Set to 1 in the environment of a `vlmops` command that another process runs and whose failure that process reports
with advice of its own (a flow's): the command then names an outage, or says it was interrupted, without saying what to
run next. Its own command line would be the wrong advice there: it names a temporary config, gone by then."""


def rerun_advice(advice: str) -> str | None:
    """A command's `advice` on what to run once the server is back (or after an interrupt); None where the process that
    runs the command gives its own (`PARENT_ADVISES_ENV`)."""
    return None if os.environ.get(PARENT_ADVISES_ENV) == "1" else advice


_URL = re.compile(r"https?://[^\s'\"<>)]+")


def unreachable_service(exc: BaseException) -> Outage | None:
    """The server a failure could not reach, read off the exception chain: an outage named already (the core's
    `ServiceUnavailable` without advice: a DVC remote), a transient error's request, or an outage a child process
    reported in the last lines its parent's error quotes (a `vlmops batch-infer` the batch-inference flow ran, a batch
    job's worker); None when `exc` is none of these or names no server."""
    chain = list(exception_chain(exc))
    named = [e for e in chain if isinstance(e, ServiceUnavailable)]
    if named:  # by the code that met it (it may have named it better than the client's error), or a flow it ran
        return named[0].outage
    if not is_transient(exc):
        reported = [found for e in chain for found in _REPORTED.finditer(str(e))]
        if not reported:
            return None
        service, url, error = reported[-1].groups()  # the child's last words
        return Outage(service, url, error)
    import botocore.exceptions as botocore
    import httpx
    import requests
    import urllib3.exceptions as urllib3

    error = one_line(exc)
    # The request that failed first (the URL it asked for says which service); a URL in a message only where no
    # request is in the chain: a message may name a server with no path (vlmops' "not found in the registry at
    # http://host:5000"), which says nothing of which service it is.
    for e in chain:
        if isinstance(e, botocore.BotoCoreError) and "endpoint_url" in getattr(e, "kwargs", {}):
            return Outage("S3", _base(str(e.kwargs["endpoint_url"])), error)
        if isinstance(e, requests.RequestException) and e.request is not None and e.request.url:
            return _outage_at(e.request.url, error)
        if isinstance(e, (httpx.RequestError, httpx.HTTPStatusError)) and (request := _httpx_request(e)) is not None:
            # Prefect's client raises httpx's errors as they are, or from a RuntimeError that only repeats the URL
            # ("Failed to reach API at ..."): httpx's says why (refused, timed out, cut).
            prefect = request.headers.get("user-agent", "").startswith("prefect/")
            return _outage_at(str(request.url), error if e is exc else one_line(e), PREFECT_API if prefect else None)
        if isinstance(e, urllib3.MaxRetryError) and e.pool is not None:
            url = f"{e.pool.scheme}://{e.pool.host}:{e.pool.port}{e.url or ''}"
            return _outage_at(url, error)
    for e in chain:
        if (found := _URL.search(str(e))) is not None:
            return _outage_at(found.group(0), error)
    return None


def one_line(exc: BaseException) -> str:
    """`Type: message` of an error, on one line (a child process's parent reads it back from its last lines), with
    passwords masked."""
    return f"{type(exc).__name__}: {' '.join(redact_uri(str(exc)).split())[:500]}"


def _httpx_request(exc: Exception) -> Any:
    """The request an httpx error was raised for, None where it has none (`.request` raises then)."""
    try:
        return exc.request  # type: ignore[attr-defined]
    except RuntimeError:
        return None


def _outage_at(url: str, error: str, service: str | None = None) -> Outage:
    """The outage of the service a request to `url` went to: named by its base URL; the Prefect API by its own
    (`.../api`, what PREFECT_API_URL says)."""
    service = service or _service_of(url)
    if service == PREFECT_API and (api := re.match(r"[a-z][a-z0-9+.-]*://[^/?#]+(?:/[^?#]*?)?/api(?=[/?#]|$)", url)):
        return Outage(service, redact_uri(api.group(0)), error)
    return Outage(service, _base(url), error)


# The Prefect API's paths (after its `/api`) that a client without Prefect's user agent asks for: Prefect's version
# check (a plain httpx client), a script's requests to the flow runs.
_PREFECT_PATHS = re.compile(
    r"/api/(?:admin|health|csrf-token|flows|flow_runs|task_runs|deployments|work_pools|work_queues|logs|artifacts"
    r"|concurrency_limits|v2/concurrency_limits|variables|events|block_\w+)\b"
)


def _service_of(url: str) -> str:
    if "/mlflow" in url or "/ajax-api/" in url or "mlflow-artifacts" in url:
        return "MLflow"
    if _PREFECT_PATHS.search(url):
        return PREFECT_API
    return "the server"


def _base(url: str) -> str:
    match = re.match(r"[a-z][a-z0-9+.-]*://[^/?#]+", url)
    return redact_uri(match.group(0) if match else url)
