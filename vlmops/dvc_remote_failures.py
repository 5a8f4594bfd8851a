"""Which failures of a DVC push or pull are the remote's: one that did not answer (an S3 endpoint down, an http(s)
remote's host) is named as such, `ServiceUnavailable` of the DVC remote, from the client's error, which a retry may fix
(`remote_outages_named`).

DVC says little of it itself: its push and pull raise only how many files did not move (it logs each file's error and
goes on with the others), and its http remote's client reads a refused connection as a file not found.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from vlmops.outages import DVC_REMOTE, Outage, ServiceUnavailable, is_transient, one_line
from vlmops.redact import redact_uri

HTTP_SCHEMES = ("http://", "https://")


# Where DVC logs why a file did not move: its push and pull then raise only how many did not (UploadError,
# DownloadError), and a remote it could not reach at all is logged, not raised ("failed to connect to s3").
DVC_LOGGERS = ("dvc", "dvc_data", "dvc_objects")


@contextmanager
def remote_outages_named(remote_url: str) -> Iterator[None]:
    """Around DVC's calls to the remote at `remote_url`: a failure caused by the remote not answering (its S3 endpoint
    down, a connection cut, 5xx) is raised as `ServiceUnavailable` of the DVC remote, from the client's error, without
    advice (the command or flow around it gives that); any other failure as it was.

    The client's error is the one raised, or, where DVC raised only a count of failed files, the last one DVC logged
    while it ran (it logs each with its traceback, then goes on with the other files). An http(s) remote's client
    says neither (a refused connection, or a 503 to every request, reads as a file not found): after a failure its URL
    is asked once more (`_http_outage`), and a host that does not answer, or answers with a server error, is the
    outage.

    Raises:
        ServiceUnavailable: the remote did not answer; a retry may pass (`is_transient`).
    """
    logged = _LoggedErrors()
    loggers = [logging.getLogger(name) for name in DVC_LOGGERS]
    for logger in loggers:
        logger.addHandler(logged)
    try:
        yield
    except Exception as err:
        causes = [err, *reversed(logged.errors)]  # what was raised, then the last file's error first
        cause = next((e for e in causes if is_transient(e)), None) or _http_outage(remote_url)
        if cause is None:
            raise
        raise ServiceUnavailable(Outage(DVC_REMOTE, redact_uri(remote_url), one_line(cause))) from cause
    finally:
        for logger in loggers:
            logger.removeHandler(logged)


HTTP_PROBE_TIMEOUT_S = 10


def _http_outage(remote_url: str) -> Exception | None:
    """For an http(s) remote, the error of a request to its URL when its host does not answer (refused, timed out, cut)
    or answers with a server error or 'too many requests' (5xx, 429: `is_transient`); None when it answers otherwise
    (a 404 of the folder, say, is a server that is up) or the remote is not http(s).

    fsspec's HTTP filesystem, which DVC's http remote uses, reports a refused connection and a 5xx alike as a file not
    found (after aiohttp-retry's own tries): the pull would fail as a missing or damaged copy (`DvcPullError`).
    A GET, not a HEAD: a server may answer a HEAD with 501 (not implemented), which is no outage.
    """
    import requests

    if not remote_url.startswith(HTTP_SCHEMES):
        return None
    try:
        with requests.get(remote_url, timeout=HTTP_PROBE_TIMEOUT_S, allow_redirects=False, stream=True) as answer:
            answer.raise_for_status()
    except (requests.ConnectionError, requests.Timeout) as err:
        return err
    except requests.HTTPError as err:
        return err if is_transient(err) else None
    return None


class _LoggedErrors(logging.Handler):
    """Keeps the exceptions logged with a record (`exc_info`) at ERROR or above, in the order they came."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
