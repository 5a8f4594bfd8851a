"""Keeping credentials out of everything vlmops writes: logs, MLflow params and tags, summaries, saved configs.

Credentials reach vlmops two ways: in the environment (S3 keys, hub tokens, the MLflow server's basic-auth
password, a database password) and inside URIs (`http://user:password@host`, `postgresql://u:p@db/x`). Both
are replaced by `***` wherever text leaves the process: `redact_uri` for one URI, `redact_text` for free
text (a log line, a command, an error), and `RedactingFilter` on the log handlers.
"""

from __future__ import annotations

import logging
import os
import re
from typing import NamedTuple
from urllib.parse import unquote

MASK = "***"
# Environment variables whose values are credentials: the names boto3, huggingface_hub, ModelScope, MLflow
# (client and server), Prefect (client and server) and libpq read, and the chat page's login. Values shorter
# than MIN_SECRET_CHARS are not masked in free text: "1" or "true" would mask half of every line. A URL with a
# password in it (MLFLOW_TRACKING_URI, PREFECT_API_DATABASE_CONNECTION_URL) is masked by the userinfo rule below.
SECRET_ENV_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MODELSCOPE_API_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PGPASSWORD",
    "POSTGRES_PASSWORD",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "VLMOPS_APP_AUTH",
)
MIN_SECRET_CHARS = 6
# scheme://user:password@host  ->  scheme://user:***@host (any scheme: http, s3, postgresql+asyncpg, ...)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@?#]*):(?P<password>[^\s@/?#]+)@")
# ?token=...&password=... in query strings
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:token|access_token|password|secret|api_key|apikey|x-amz-signature|x-amz-credential)=)[^&\s#]+",
    re.IGNORECASE,
)


def redact_uri(uri: str) -> str:
    """`uri` with the password of its userinfo and secret query values masked; anything else unchanged."""
    return _QUERY_SECRET.sub(rf"\g<key>{MASK}", _USERINFO.sub(rf"\g<scheme>\g<user>:{MASK}@", uri))


class UriLogin(NamedTuple):
    """The login inside a URI's userinfo, and the URI without it."""

    uri: str
    """The URI with its whole userinfo (`user:password@`) taken out."""
    user: str
    password: str
    """As the URI holds it, %-escapes decoded; `MASK` in a URI `redact_uri` wrote."""


def uri_login(uri: str) -> UriLogin | None:
    """The user and password in the userinfo that `uri` starts with (`scheme://user:password@host/...`); None where it
    holds no password."""
    match = _USERINFO.match(uri)
    if match is None:
        return None
    rest = uri[match.end() :]
    return UriLogin(match["scheme"] + rest, unquote(match["user"]), unquote(match["password"]))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The credential values set in the environment, longest first (so a value inside another is masked last)."""
    env = os.environ if environ is None else environ
    values = {env[name] for name in SECRET_ENV_NAMES if len(env.get(name, "")) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, environ: dict[str, str] | None = None) -> str:
    """Free text with every URI password and every credential value from the environment masked."""
    text = redact_uri(text)
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in the formatted message (arguments included) and in the traceback
    of a logged exception: an error deep in the chain names what it was given (MLflow's 'API request to
    http://user:password@host/... failed'), and Prefect's handlers send the traceback to its API with the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        trace = record.exc_text or (_TRACEBACKS.formatException(record.exc_info) if record.exc_info else None)
        if trace and (masked := redact_text(trace)) != trace:
            # The masked text stands for the traceback: formatters append exc_text, and with exc_info gone none
            # renders the frames again (Prefect's JSON formatter would, from exc_info).
            record.exc_info, record.exc_text = None, masked
        return True


_TRACEBACKS = logging.Formatter()


def redact_log_handlers() -> None:
    """Install `RedactingFilter` on every handler configured so far: the root logger's and those of named
    loggers (Prefect's, which also ship records to its API and database). Idempotent; call it after logging
    is set up."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
