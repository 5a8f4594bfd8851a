"""Which failures of a DVC push or pull are the remote's, named as such (`remote_failures_named`): a remote that did not
answer (an S3 endpoint down, an http(s) remote's host) is `ServiceUnavailable` of the DVC remote, which a retry may fix;
one that refused the login it was given (HTTP 401 or 403: a wrong password, none, S3 keys it does not take) is
`RemoteLoginRefused`, input for the user to fix, which no retry does.

DVC says little of either itself: its push and pull raise only how many files did not move (it logs each file's error
and goes on with the others), and its http remote's client reads a refused connection, a 503 and a 401 alike as a file
not found, so a pull called the remote's copy missing or damaged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from urllib.parse import urlsplit, urlunsplit

from vlmops.errors import UserInputError
from vlmops.outages import DVC_REMOTE, Outage, ServiceUnavailable, exception_chain, is_transient, one_line
from vlmops.redact import redact_uri, uri_login

HTTP_SCHEMES = ("http://", "https://")
# The statuses of a login refused: none or a wrong one (401), or one the remote does not let in here (403).
REFUSED_STATUSES = (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN)
# Where a password given on the command line would end up: the reason a login's fix names the config file.
NOT_WITH_SET = "(not with --set: overrides are stored as flow-run parameters, so they may hold no password)"


class RemoteLoginRefused(UserInputError):  # noqa: N818 (reads as "the remote refused the login")
    """The DVC remote refused the login it was given (HTTP 401 or 403): the URL (password masked), the status, and
    where the login goes."""

    def __init__(self, remote_url: str, status: int, error: str, user: str | None = None):
        self.url = redact_uri(remote_url)
        self.status = status
        if remote_url.startswith(HTTP_SCHEMES):
            whose = f"the login of user {user!r}" if user is not None else "a request without a login"
            parts = urlsplit(remote_url)
            with_login = urlunsplit(parts._replace(netloc="USER:PASSWORD@" + parts.netloc.rpartition("@")[2]))
            fix = (
                f"set versioning.remote_url in the config file to {with_login}, a user and password the remote lets "
                f"read (and, for a push, write) {NOT_WITH_SET}"
            )
        elif remote_url.startswith("s3://"):
            whose = "the credentials"
            fix = (
                "give DVC's S3 remote keys that may read (and, for a push, write) it: AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY in the environment, or a profile of the AWS config (AWS_PROFILE)"
            )
        else:
            whose = "the credentials"
            fix = "give DVC credentials the remote takes, where DVC's remote of this kind reads them"
        super().__init__(
            f"the DVC remote {self.url} refused {whose} (HTTP {status} {HTTPStatus(status).phrase}; {error}): {fix}"
        )


# Where DVC logs why a file did not move: its push and pull then raise only how many did not (UploadError,
# DownloadError), and a remote it could not reach at all is logged, not raised ("failed to connect to s3").
DVC_LOGGERS = ("dvc", "dvc_data", "dvc_objects")


@contextmanager
def remote_failures_named(remote_url: str, login: tuple[str, str] | None = None) -> Iterator[None]:
    """Around DVC's calls to the remote at `remote_url`, given `login` (the user and password DVC sends an http(s)
    remote, None for none): a failure caused by the remote not answering (its S3 endpoint down, a connection cut, 5xx)
    is raised as `ServiceUnavailable` of the DVC remote, from the client's error, without advice (the command or flow
    around it gives that); one caused by the remote refusing the login (401, 403) as `RemoteLoginRefused`; any other
    failure as it was.

    The client's error is the one raised, or, where DVC raised only a count of failed files, the last one DVC logged
    while it ran (it logs each with its traceback, then goes on with the other files). An http(s) remote's client
    says neither (a refused connection, a 503 or a 401 to every request reads as a file not found): after a failure its
    URL is asked once more, with `login` (`_http_answer`), and a host that does not answer, or answers with a server
    error, is the outage; one that answers 401 or 403, the refusal.

    Raises:
        ServiceUnavailable: the remote did not answer; a retry may pass (`is_transient`).
        RemoteLoginRefused: the remote refused the login (a `UserInputError`: no retry passes).
    """
    logged = _LoggedErrors()
    loggers = [logging.getLogger(name) for name in DVC_LOGGERS]
    for logger in loggers:
        logger.addHandler(logged)
    try:
        yield
    except Exception as err:
        causes = [err, *reversed(logged.errors)]  # what was raised, then the last file's error first
        cause = next((e for e in causes if is_transient(e) or _refused(e)), None) or _http_answer(remote_url, login)
        if cause is None:
            raise
        if refused := _refused(cause):
            status, error = refused
            user = login[0] if login else None
            raise RemoteLoginRefused(remote_url, status, one_line(error), user) from cause
        raise ServiceUnavailable(Outage(DVC_REMOTE, redact_uri(remote_url), one_line(cause))) from cause
    finally:
        for logger in loggers:
            logger.removeHandler(logged)


def _refused(exc: BaseException) -> tuple[int, BaseException] | None:
    """The status (401, 403) of the remote's answer that `exc`, or an error it was raised from, reports, and that
    error; None where none does. DVC's clients: requests (the probe), aiohttp (the http remote), botocore (S3, under
    s3fs's PermissionError)."""
    import aiohttp
    import botocore.exceptions as botocore
    import requests

    for error in exception_chain(exc):
        status = None
        if isinstance(error, requests.HTTPError) and error.response is not None:
            status = error.response.status_code
        elif isinstance(error, aiohttp.ClientResponseError):
            status = error.status
        elif isinstance(error, botocore.ClientError):
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in REFUSED_STATUSES:
            return int(status), error
    return None


HTTP_PROBE_TIMEOUT_S = 10


def _http_answer(remote_url: str, login: tuple[str, str] | None) -> Exception | None:
    """For an http(s) remote, the error of a request to its URL with `login` when its host does not answer (refused,
    timed out, cut), answers with a server error or 'too many requests' (5xx, 429: `is_transient`), or refuses the
    login (401, 403); None when it answers otherwise (a 404 of the folder, say, is a server that is up and let the
    request in) or the remote is not http(s).

    fsspec's HTTP filesystem, which DVC's http remote uses, reports a refused connection, a 5xx and a 401 alike as a
    file not found (after aiohttp-retry's own tries): the pull would fail as a missing or damaged copy (`DvcPullError`).
    A GET, not a HEAD: a server may answer a HEAD with 501 (not implemented), which is no outage.
    """
    import requests

    if not remote_url.startswith(HTTP_SCHEMES):
        return None
    # The login DVC sends, not the URL's: a URL vlmops recorded holds the password masked.
    url = found.uri if (found := uri_login(remote_url)) else remote_url
    try:
        with requests.get(url, auth=login, timeout=HTTP_PROBE_TIMEOUT_S, allow_redirects=False, stream=True) as answer:
            answer.raise_for_status()
    except (requests.ConnectionError, requests.Timeout) as err:
        return err
    except requests.HTTPError as err:
        return err if is_transient(err) or _refused(err) else None
    return None


class _LoggedErrors(logging.Handler):
    """Keeps the exceptions logged with a record (`exc_info`) at ERROR or above, in the order they came."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
