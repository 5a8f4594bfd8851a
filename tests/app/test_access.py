"""The chat page binds to 127.0.0.1 by default; any other host needs a login, and without one it is refused."""

from __future__ import annotations

import pytest

from vlmops.app.access import AUTH_ENV, is_local, page_login
from vlmops.cli.main import main
from vlmops.errors import UserInputError


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.0.1.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("myhost.example", False),
    ],
)
def test_is_local(host: str, local: bool) -> None:
    assert is_local(host) is local


def test_local_page_needs_no_login_but_takes_one() -> None:
    assert page_login("127.0.0.1", None, {}) is None
    assert page_login("127.0.0.1", "ann:pw", {}) == ("ann", "pw")


def test_network_host_without_login_is_refused() -> None:
    with pytest.raises(
        UserInputError,
        match=rf"--host 0\.0\.0\.0 opens the chat page to other machines.*{AUTH_ENV}=USER:PASSWORD.*--auth",
    ):
        page_login("0.0.0.0", None, {})


def test_network_host_takes_the_login_from_auth_or_the_environment() -> None:
    assert page_login("0.0.0.0", "ann:s3:cret", {}) == ("ann", "s3:cret")  # the password may hold colons
    assert page_login("0.0.0.0", None, {AUTH_ENV: "bob:pw"}) == ("bob", "pw")
    assert page_login("0.0.0.0", "ann:pw", {AUTH_ENV: "bob:pw"}) == ("ann", "pw")  # the flag wins


@pytest.mark.parametrize("value", ["nopassword", "ann:", ":pw", ""])
def test_malformed_login_is_refused(value: str) -> None:
    with pytest.raises(UserInputError, match="USER:PASSWORD"):
        page_login("0.0.0.0", value, {})


def test_cli_refuses_an_open_network_page_before_loading_anything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(AUTH_ENV, raising=False)
    # The model does not exist: the refusal comes first, before any loading.
    assert main(["app", "--model", "no/such/model", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 opens the chat page to other machines")
    assert "no/such/model" not in err
