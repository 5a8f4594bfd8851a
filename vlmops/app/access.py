"""Who may open the chat page: it binds to 127.0.0.1 unless told otherwise, and any other host needs a login.

A page that answers with a model (and reads the images it is sent) must never end up open on the network by
accident, so `--host 0.0.0.0` without a password is refused rather than served.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from vlmops.errors import UserInputError

AUTH_ENV = "VLMOPS_APP_AUTH"
"""The environment variable that holds `USER:PASSWORD` (kept out of `ps` and shell history, unlike --auth)."""
DEFAULT_HOST = "127.0.0.1"


def is_local(host: str) -> bool:
    """True for the loopback interface only (127.0.0.0/8, ::1, localhost): no other machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def page_login(host: str, auth: str | None, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The (user, password) the page asks for, or None for an open page on the loopback interface.

    Args:
        host: the interface to bind (`--host`).
        auth: `--auth USER:PASSWORD`; None: the `VLMOPS_APP_AUTH` environment variable, if set.

    Raises:
        UserInputError: a malformed login, or a host other machines can reach and no login.
    """
    value = auth if auth is not None else environ.get(AUTH_ENV)
    source = "--auth" if auth is not None else AUTH_ENV
    if value is None:
        if is_local(host):
            return None
        raise UserInputError(
            f"--host {host} opens the chat page to other machines, so it needs a login: set "
            f"{AUTH_ENV}=USER:PASSWORD in the environment (or pass --auth USER:PASSWORD), or leave out --host "
            f"to serve on {DEFAULT_HOST} only"
        )
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserInputError(
            f"{source}: write the login as USER:PASSWORD (both non-empty), got {len(value)} characters without that form"
        )
    return user, password
