"""Which failures of a DVC push or pull are the remote's, named as such (`remote_failures_named`): a remote that did not
answer (an S3 endpoint down, an http(s) remote's host) is `ServiceUnavailable` of the DVC remote, which a retry may fix;
one that refused the login it was given (HTTP 401: a wrong password, or none; S3 keys it does not know or a signature
they do not make) is `RemoteLoginRefused`, and one that refused access with a login it took (HTTP 403) is
`RemoteAccessRefused`: input for the user to fix, which no retry does.

A 403 is not read as a refused login: S3 and the servers that copy its API answer 403 for an object that is missing when
the keys may not list the bucket, and for keys they do not know (with the code in the answer's body, which a HEAD
request does not have). After a 403, the remote is asked once more with the same login (an http(s) remote's URL, an S3
remote's listing): an answer that refuses the login itself makes it `RemoteLoginRefused`; a listing that passes says
the login lacks access (a missing object would be a 404 then); else the error names both readings, and both fixes.

DVC says little of any of this itself: its push and pull raise only how many files did not move (it logs each file's
error and goes on with the others), and its http remote's client reads a refused connection, a 503 and a 401 alike as a
file not found, so a pull called the remote's copy missing or damaged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit, urlunsplit

from vlmops.errors import UserInputError
from vlmops.outages import DVC_REMOTE, Outage, ServiceUnavailable, exception_chain, is_transient, one_line
from vlmops.redact import redact_uri, uri_login

HTTP_SCHEMES = ("http://", "https://")
# S3's codes for a login it does not take: keys it does not know, or a signature they do not make (answered 403, not
# 401, with the code in the body: a HEAD's answer, without one, is a bare 403, and the listing tells it apart), and a
# temporary login's session token that has expired or is not one (answered 400).
LOGIN_REFUSED_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")
# Where a password given on the command line would end up: the reason a login's fix names the config file.
NOT_WITH_SET = "(not with --set: overrides are stored as flow-run parameters, so they may hold no password)"


class RemoteRefused(UserInputError):  # noqa: N818 (reads as "the remote refused")
    """The DVC remote refused a request (HTTP 401 or 403): its URL (password masked) and the status."""

    def __init__(self, remote_url: str, status: int, message: str):
        self.url = redact_uri(remote_url)
        self.status = status
        super().__init__(message)


class RemoteLoginRefused(RemoteRefused):
    """The DVC remote refused the login it was given (HTTP 401, or S3's 403 for keys it does not know or a wrong
    secret): the URL (password masked), the status, and where the login goes."""

    def __init__(self, remote_url: str, status: int, error: str, user: str | None = None):
        super().__init__(
            remote_url,
            status,
            f"the DVC remote {redact_uri(remote_url)} refused {_whose(remote_url, user)} "
            f"(HTTP {status} {HTTPStatus(status).phrase}; {error}): {_login_fix(remote_url)}",
        )


class RemoteAccessRefused(RemoteRefused):
    """The DVC remote answered 403 Forbidden to a login it did not refuse as such: the login lacks access to what was
    asked for, or that is missing and the server hides it. `may_list`: whether the same login may list the remote (an
    S3 remote's, which then answers 404 for a missing object the login may read: it lacks access); None where that is
    not known."""

    def __init__(self, remote_url: str, error: str, user: str | None = None, may_list: bool | None = None):
        self.may_list = may_list
        whose, fix = _whose(remote_url, user), _login_fix(remote_url)
        request = whose if whose.startswith("a request") else f"a request with {whose}"
        login = "a request without a login" if whose.startswith("a request") else "the login"
        if may_list:
            reading = (
                f"{login} may list the remote but lacks access to what was asked for (were that only missing, the "
                "answer would be 404 Not Found)"
            )
        else:
            listing = " (it may not list the remote either)" if may_list is False else ""
            reading = (
                f"either {login} lacks access to what was asked for{listing}, or that is missing and the server hides "
                "it (S3 and servers like it answer 403 for a missing object to a login that may not list the bucket)"
            )
            fix += (
                "; if it has that access, the remote's copy is missing: push it again from the DVC repository that "
                "tracked it (`dvc push` there), or point versioning.remote_url at a remote that has it"
            )
        super().__init__(
            remote_url,
            HTTPStatus.FORBIDDEN,
            f"the DVC remote {redact_uri(remote_url)} refused {request} (HTTP 403 Forbidden; {error}): {reading}: {fix}",
        )


def _whose(remote_url: str, user: str | None) -> str:
    """The login a request to the remote at `remote_url` carried, in words."""
    if remote_url.startswith(HTTP_SCHEMES):
        return f"the login of user {user!r}" if user is not None else "a request without a login"
    return "the credentials"


def _login_fix(remote_url: str) -> str:
    """Where the login of the remote at `remote_url` goes, for one that reads and (for a push) writes it."""
    if remote_url.startswith(HTTP_SCHEMES):
        parts = urlsplit(remote_url)
        with_login = urlunsplit(parts._replace(netloc="USER:PASSWORD@" + parts.netloc.rpartition("@")[2]))
        return (
            f"set versioning.remote_url in the config file to {with_login}, a user and password the remote lets "
            f"read (and, for a push, write) {NOT_WITH_SET}"
        )
    if remote_url.startswith("s3://"):
        return (
            "give DVC's S3 remote keys that may list and read (and, for a push, write) it: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY in the environment (with AWS_SESSION_TOKEN for temporary keys, renewed once they "
            "expire), or a profile of the AWS config (AWS_PROFILE)"
        )
    return "give DVC credentials the remote takes, where DVC's remote of this kind reads them"


# Where DVC logs why a file did not move: its push and pull then raise only how many did not (UploadError,
# DownloadError), and a remote it could not reach at all is logged, not raised ("failed to connect to s3").
DVC_LOGGERS = ("dvc", "dvc_data", "dvc_objects")


@contextmanager
def remote_failures_named(
    remote_url: str, login: tuple[str, str] | None = None, list_remote: Callable[[], object] | None = None
) -> Iterator[None]:
    """Around DVC's calls to the remote at `remote_url`, given `login` (the user and password DVC sends an http(s)
    remote, None for none): a failure caused by the remote not answering (its S3 endpoint down, a connection cut, 5xx)
    is raised as `ServiceUnavailable` of the DVC remote, from the client's error, without advice (the command or flow
    around it gives that); one caused by the remote refusing the login (401; S3's 403 for keys it does not know or a
    wrong secret) as `RemoteLoginRefused`; one it answered 403 otherwise as `RemoteAccessRefused`; any other failure as
    it was.

    The client's error is the one raised, or, where DVC raised only a count of failed files, the last one DVC logged
    while it ran (it logs each with its traceback, then goes on with the other files). An http(s) remote's client
    says neither (a refused connection, a 503 or a 401 to every request reads as a file not found): after a failure its
    URL is asked once more, with `login` (`_http_answer`), and a host that does not answer, or answers with a server
    error, is the outage; one that answers 401 or 403, the refusal. After a 403 of another remote, `list_remote` (a
    listing of the remote's root with DVC's credentials) tells a refused login from a lack of access (`_told_apart`).

    Raises:
        ServiceUnavailable: the remote did not answer; a retry may pass (`is_transient`).
        RemoteLoginRefused: the remote refused the login (a `UserInputError`: no retry passes).
        RemoteAccessRefused: the remote answered 403 to a login it took (a `UserInputError`: no retry passes).
    """
    logged = _LoggedErrors()
    loggers = [logging.getLogger(name) for name in DVC_LOGGERS]
    for logger in loggers:
        logger.addHandler(logged)
    try:
        yield
    except Exception as err:
        causes = [err, *reversed(logged.errors)]  # what was raised, then the last file's error first
        cause = next((e for e in causes if is_transient(e) or _refusal(e)), None) or _http_answer(remote_url, login)
        if cause is None:
            raise
        refusal = _refusal(cause)
        if refusal is None:
            raise ServiceUnavailable(Outage(DVC_REMOTE, redact_uri(remote_url), one_line(cause))) from cause
        user = login[0] if login else None
        may_list = None
        if not refusal.of_login:
            refusal, may_list = _told_apart(refusal, remote_url, login, list_remote)
        if refusal.of_login:
            raise RemoteLoginRefused(remote_url, refusal.status, one_line(refusal.error), user) from refusal.error
        raise RemoteAccessRefused(remote_url, one_line(refusal.error), user, may_list) from refusal.error
    finally:
        for logger in loggers:
            logger.removeHandler(logged)


@dataclass(frozen=True)
class _Refusal:
    """A remote's answer that refused a request: its status, the client's error that reports it, and whether it
    refused the login itself (401, S3's `LOGIN_REFUSED_CODES`) rather than access with a login it took (403)."""

    status: int
    error: BaseException
    of_login: bool


def _refusal(exc: BaseException) -> _Refusal | None:
    """The refusal (401, 403, S3's `LOGIN_REFUSED_CODES`) that `exc`, or an error it was raised from, reports; None
    where none does. DVC's clients: requests (the probe), aiohttp (the http remote), botocore (S3, under s3fs's
    PermissionError)."""
    import aiohttp
    import botocore.exceptions as botocore
    import requests

    for error in exception_chain(exc):
        status, code = None, None
        if isinstance(error, requests.HTTPError) and error.response is not None:
            status = error.response.status_code
        elif isinstance(error, aiohttp.ClientResponseError):
            status = error.status
        elif isinstance(error, botocore.ClientError):
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = error.response.get("Error", {}).get("Code")
        if status == HTTPStatus.UNAUTHORIZED or code in LOGIN_REFUSED_CODES:
            return _Refusal(int(status or HTTPStatus.FORBIDDEN), error, of_login=True)
        if status == HTTPStatus.FORBIDDEN:
            return _Refusal(int(status), error, of_login=False)
    return None


def _told_apart(
    refusal: _Refusal, remote_url: str, login: tuple[str, str] | None, list_remote: Callable[[], object] | None
) -> tuple[_Refusal, bool | None]:
    """After a 403, one more request with the same login: the refusal to report, and whether the login may list the
    remote (None: not known).

    An http(s) remote's URL is asked (unless that request was the one answered 403): a 401 there is the login refused.
    Another remote is listed (`list_remote`): S3's answer with a body names keys it does not know or a wrong secret
    (the login refused), or AccessDenied (keys it took that may not list, to which a missing object is 403 too); a
    listing that passes (or finds the folder empty) says a 403 is the login's lack of access, not a missing object:
    S3 answers 404 for a missing object to keys that may list the bucket and read it.
    """
    import requests

    if remote_url.startswith(HTTP_SCHEMES):
        if not isinstance(refusal.error, requests.HTTPError):
            again = _refusal(answer) if (answer := _http_answer(remote_url, login)) is not None else None
            if again is not None and again.of_login:
                return again, None
        return refusal, None
    if list_remote is None:
        return refusal, None
    try:
        list_remote()
    except FileNotFoundError:  # nothing there yet: the listing itself was let in
        return refusal, True
    except Exception as err:  # a probe: what it says, if anything, is read below
        again = _refusal(err)
        if again is None:
            return refusal, None
        return (again, None) if again.of_login else (refusal, False)
    return refusal, True


HTTP_PROBE_TIMEOUT_S = 10


def _http_answer(remote_url: str, login: tuple[str, str] | None) -> Exception | None:
    """For an http(s) remote, the error of a request to its URL with `login` when its host does not answer (refused,
    timed out, cut), answers with a server error or 'too many requests' (5xx, 429: `is_transient`), or refuses the
    request (401, 403: `_refusal`); None when it answers otherwise (a 404 of the folder, say, is a server that is up
    and let the request in) or the remote is not http(s).

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
        return err if is_transient(err) or _refusal(err) else None
    return None


class _LoggedErrors(logging.Handler):
    """Keeps the exceptions logged with a record (`exc_info`) at ERROR or above, in the order they came."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
