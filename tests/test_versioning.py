"""DVC: a real repository in a temporary folder, objects pushed to a local remote."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest

from tests.http_remote import http_remote
from vlmops.versioning import DvcStore, cache_object_path, read_dvc_file

MISSING_MD5 = "d41d8cd98f00b204e9800998ecf8427e.dir"  # an object no remote of these tests has
PASSWORD = "s3cret-dvc-pw"


def test_track_folder_pushes_objects(tmp_path: Path) -> None:
    data = tmp_path / "ws" / "datasets" / "abc"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"a": 1}\n')
    (data / "img.png").write_bytes(b"\x89PNG fake but bytes are bytes")
    store = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote"))
    version = store.track(data)
    assert version.md5.endswith(".dir")
    assert version.nfiles == 2
    assert Path(version.dvc_file) == tmp_path / "ws" / "datasets" / "abc.dvc"
    assert read_dvc_file(Path(version.dvc_file)).md5 == version.md5
    remote = tmp_path / "remote"
    assert cache_object_path(remote, version.md5.removesuffix(".dir") + ".dir").is_file()
    # every file's object is in the remote too
    pushed = [p for p in (remote / "files" / "md5").rglob("*") if p.is_file()]
    assert len(pushed) == 3


def test_same_content_same_hash_changed_content_new_hash(tmp_path: Path) -> None:
    store = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote"))
    f = tmp_path / "ws" / "model"
    f.mkdir(parents=True)
    (f / "w.bin").write_bytes(b"1234")
    first = store.track(f)
    assert store.track(f).md5 == first.md5
    (f / "w.bin").write_bytes(b"12345")
    assert store.track(f).md5 != first.md5


def test_outside_repo_is_refused(tmp_path: Path) -> None:
    store = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote"))
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ValueError, match="versioning.repo"):
        store.track(other)


def test_concurrent_tracks_are_serialised(tmp_path: Path) -> None:
    store = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote"))
    folders = []
    for name in ("a", "b", "c"):
        folder = tmp_path / "ws" / name
        folder.mkdir(parents=True)
        (folder / "x.txt").write_text(name)
        folders.append(folder)
    errors: list[BaseException] = []

    def work(folder: Path) -> None:
        try:
            DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote")).track(folder)
        except BaseException as err:  # the point of the test is that nothing raises
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all((f.parent / f"{f.name}.dvc").is_file() for f in folders)
    del store


def test_the_cache_links_the_tracked_files_instead_of_copying_them(tmp_path: Path) -> None:
    """`dvc add` of a model leaves one copy on disk beside the remote's, not a second one in the cache."""
    import hashlib

    weights = tmp_path / "ws" / "merged" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights " * 1000)
    DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote")).track(weights.parent)
    md5 = hashlib.md5(weights.read_bytes(), usedforsecurity=False).hexdigest()
    assert weights.samefile(cache_object_path(tmp_path / "ws" / ".dvc" / "cache", md5))
    assert not weights.samefile(cache_object_path(tmp_path / "remote", md5))  # the shared store's own copy


def test_an_s3_remote_that_does_not_answer_is_named_and_a_retry_may_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push and a pull with the DVC remote's S3 endpoint at a port nothing listens on: each raises
    `ServiceUnavailable` naming the DVC remote and its URL, with the S3 client's error (which names the endpoint), and a
    retry may pass. The pull's DVC error was only "1 files failed to download" (not even transient): DVC logs why."""
    from vlmops.outages import DVC_REMOTE, ServiceUnavailable, is_transient, unreachable_service
    from vlmops.versioning import pull_tracked

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "vlmops-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "vlmops-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the S3 client's own retries, 20-40 s of them, are not under test
    data = tmp_path / "ws" / "dataset"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"a": 1}\n')
    refused = rf'EndpointConnectionError: Could not connect to the endpoint URL: "{re.escape(endpoint)}/dvc\S*"$'

    with pytest.raises(ServiceUnavailable, match=rf"^DVC remote at s3://dvc/store did not answer: .*{refused}") as push:
        DvcStore(tmp_path / "ws", "s3", "s3://dvc/store").track(data)
    with pytest.raises(ServiceUnavailable, match=rf"^DVC remote at s3://dvc/store did not answer: .*{refused}") as pull:
        pull_tracked("d41d8cd98f00b204e9800998ecf8427e.dir", "model", "s3://dvc/store", tmp_path / "pulled")
    for raised in (push.value, pull.value):
        assert raised.then is None  # the command or the flow around it says what to run
        assert is_transient(raised)
        assert unreachable_service(raised) == raised.outage
        assert raised.service == DVC_REMOTE and raised.url == "s3://dvc/store"


def test_a_remote_that_answers_with_an_error_of_its_own_is_no_outage(tmp_path: Path) -> None:
    """A pull of an object the (local) remote does not have is no outage: DVC's own error, as before."""
    from vlmops.outages import ServiceUnavailable
    from vlmops.versioning import DvcPullError, pull_tracked

    (tmp_path / "remote").mkdir()
    with pytest.raises(DvcPullError) as raised:
        pull_tracked("d41d8cd98f00b204e9800998ecf8427e.dir", "model", str(tmp_path / "remote"), tmp_path / "pulled")
    assert not isinstance(raised.value, ServiceUnavailable)


def test_an_http_remote_whose_host_does_not_answer_is_named_and_a_retry_may_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DVC's http remote reports a refused connection as a file not found: the pull said the remote's copy was missing
    or damaged. Its host is asked once more after the failure, and one that does not answer is the outage, named
    with the URL's password masked."""
    from vlmops.outages import DVC_REMOTE, ServiceUnavailable, is_transient, unreachable_service
    from vlmops.versioning import pull_tracked

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
    caplog.set_level(logging.INFO, logger="vlmops")
    with pytest.raises(ServiceUnavailable) as raised:
        pull_tracked(MISSING_MD5, "model", f"http://vlmops:{PASSWORD}@{host}/dvc", tmp_path / "pulled")
    assert re.match(
        rf"DVC remote at http://vlmops:\*\*\*@{host}/dvc did not answer: ConnectionError: ", str(raised.value)
    )
    assert "Connection refused" in str(raised.value)
    assert raised.value.service == DVC_REMOTE and raised.value.then is None
    assert is_transient(raised.value)
    assert unreachable_service(raised.value) == raised.value.outage
    assert PASSWORD not in str(raised.value) and PASSWORD not in caplog.text


def test_an_http_remote_that_answers_without_the_object_says_it_is_missing_with_its_password_masked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A remote served over HTTP pulls what was pushed to it; an object it lacks is DvcPullError (no outage: the host
    answered), whose message and log lines name the remote without the password in its URL."""
    from vlmops.outages import ServiceUnavailable
    from vlmops.versioning import DvcPullError, pull_tracked

    data = tmp_path / "ws" / "model"
    data.mkdir(parents=True)
    (data / "w.bin").write_bytes(b"weights")
    version = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote")).track(data)
    caplog.set_level(logging.INFO, logger="vlmops")
    with http_remote(tmp_path / "remote") as host:  # it ignores the URL's login
        url = f"http://vlmops:{PASSWORD}@{host}"
        pulled = pull_tracked(version.md5, "model", url, tmp_path / "pulled")
        assert (pulled / "w.bin").read_bytes() == b"weights"
        with pytest.raises(DvcPullError, match="the remote's copy is missing or damaged") as raised:
            pull_tracked(MISSING_MD5, "model", url, tmp_path / "other")
    assert not isinstance(raised.value, ServiceUnavailable)
    assert f"from http://vlmops:***@{host}: " in str(raised.value)
    assert PASSWORD not in str(raised.value)
    assert PASSWORD not in " ".join(r.getMessage() for r in caplog.records if r.name.startswith("vlmops"))


def _files_holding(root: Path, secret: str) -> list[str]:
    """The files under `root` whose bytes hold `secret`, relative to `root`."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
    )


def test_a_password_in_an_http_remote_url_is_given_to_dvc_and_recorded_nowhere(tmp_path: Path) -> None:
    """A push to and a pull from an http remote behind basic auth, its login in versioning.remote_url: DVC gets the
    password in `.dvc/config.local` (git-ignored), and neither `.dvc/config` (committed; an older vlmops wrote the URL
    with its password there), the recorded URL, nor the registered pointer hold it. Pulling that pointer takes the
    password from the config's remote_url; without it, the error says where to give it."""
    import subprocess

    from vlmops.errors import UserInputError
    from vlmops.versioning import checkout_pointer, pull_tracked, write_pointer

    workspace = tmp_path / "ws"
    (workspace / "model").mkdir(parents=True)
    (workspace / "model" / "w.bin").write_bytes(b"weights " * 100)
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    with http_remote(tmp_path / "remote", login=("vlmops", PASSWORD)) as host:
        url = f"http://vlmops:{PASSWORD}@{host}/dvc"
        (workspace / ".dvc").mkdir()
        (workspace / ".dvc" / "config").write_text(f"[core]\n    remote = http\n['remote \"http\"']\n    url = {url}\n")
        version = DvcStore(workspace, "http", url).track(workspace / "model")
        pointer = write_pointer(version, tmp_path / "registered")

        assert version.remote_url == f"http://vlmops:***@{host}/dvc"
        assert _files_holding(workspace, PASSWORD) == [".dvc/config.local"]
        ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=workspace, capture_output=True)
        assert ignored.returncode == 0, "git would commit the password"
        assert _files_holding(tmp_path / "registered", PASSWORD) == []

        pulled = checkout_pointer(pointer, tmp_path / "pulled", config_remote_url=url)
        assert (pulled / "w.bin").read_bytes() == b"weights " * 100
        for pull in (
            lambda: checkout_pointer(pointer, tmp_path / "no-password"),
            lambda: checkout_pointer(pointer, tmp_path / "other-remote", config_remote_url=f"http://{host}/other"),
            lambda: pull_tracked(version.md5, "model", version.remote_url, tmp_path / "by-hash"),
        ):
            with pytest.raises(UserInputError) as raised:
                pull()
            assert str(raised.value).startswith(f"the DVC remote http://vlmops:***@{host}/dvc needs its password")
            assert "set versioning.remote_url in the config file to this URL with the password in place of ***" in (
                str(raised.value)
            )
    assert _files_holding(tmp_path / "pulled", PASSWORD) == []  # the pull's throwaway DVC repository is gone


def test_a_password_where_dvc_reads_none_is_refused_at_the_config_key(tmp_path: Path) -> None:
    """DVC's S3 remote reads no login from its URL: a password there is refused when the config loads, naming the key
    and its line and where S3 credentials go, with the password masked; the same from a DvcStore made in code (the
    password would have landed in `.dvc/config` as the URL)."""
    from vlmops.config import ConfigError, load_config
    from vlmops.errors import UserInputError

    config = tmp_path / "pipeline.yaml"
    config.write_text(f"versioning:\n  remote_url: s3://key:{PASSWORD}@bucket/dvc\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    message = str(raised.value)
    assert f"{config}:2: versioning.remote_url: s3://key:***@bucket/dvc holds a password" in message
    assert "AWS_SECRET_ACCESS_KEY in the environment" in message and PASSWORD not in message
    (tmp_path / "ws" / "data").mkdir(parents=True)
    with pytest.raises(UserInputError, match=r"^versioning.remote_url: s3://key:\*\*\*@bucket/dvc holds a password"):
        DvcStore(tmp_path / "ws", "s3", f"s3://key:{PASSWORD}@bucket/dvc").track(tmp_path / "ws" / "data")
    assert _files_holding(tmp_path / "ws", PASSWORD) == []


def _pull_and_push_answered(tmp_path: Path, status: int, error: type[Exception]) -> tuple[str, list[Exception]]:
    """A pull and a push against an http remote that answers `status` to every request, each raising `error`: the
    remote's host and what they raised."""
    from vlmops.versioning import pull_tracked

    data = tmp_path / "ws" / "model"
    data.mkdir(parents=True)
    (data / "w.bin").write_bytes(b"weights")
    with http_remote(tmp_path / "remote", status=status) as host:
        url = f"http://vlmops:{PASSWORD}@{host}/dvc"
        with pytest.raises(error) as pull:
            pull_tracked(MISSING_MD5, "model", url, tmp_path / "pulled")
        with pytest.raises(error) as push:
            DvcStore(tmp_path / "ws", "http", url).track(data)
    return host, [pull.value, push.value]


def test_an_http_remote_that_answers_503_to_everything_is_named_unavailable(tmp_path: Path) -> None:
    """A remote whose front end answers but whose storage is down (503 to every request): DVC's http client reads it as
    a file not found, and the pull said the remote's copy was missing or damaged. It is the remote's outage, named
    with its URL (password masked), and a retry may pass; a push there is the same."""
    from vlmops.outages import DVC_REMOTE, ServiceUnavailable, is_transient, unreachable_service

    host, raised_both = _pull_and_push_answered(tmp_path, 503, ServiceUnavailable)
    for raised in raised_both:
        assert str(raised).startswith(f"DVC remote at http://vlmops:***@{host}/dvc did not answer: HTTPError: 503 ")
        assert raised.service == DVC_REMOTE and raised.then is None
        assert is_transient(raised)
        assert unreachable_service(raised) == raised.outage
        assert PASSWORD not in str(raised)


def _login_fix(host: str) -> str:
    """What a refused login's message says to do, for the http remote at `host`."""
    return (
        f"set versioning.remote_url in the config file to http://USER:PASSWORD@{host}/dvc, a user and password the "
        "remote lets read (and, for a push, write)"
    )


def test_an_http_remote_that_refuses_the_login_says_so_for_a_pull_and_a_push(tmp_path: Path) -> None:
    """A wrong password for an http remote behind basic auth, or none: DVC's http client reads the 401 as a file not
    found, and the pull said the remote's copy was missing or damaged (a push, `2 files failed to upload`). It is the
    login the remote refused, named with the remote's URL (password masked), the status, and where the login goes; a
    bad input (exit 2), no outage, so not retried."""
    from vlmops.errors import UserInputError
    from vlmops.outages import ServiceUnavailable, is_transient, unreachable_service
    from vlmops.versioning import pull_tracked

    wrong = "not-the-pw"
    data = tmp_path / "ws" / "model"
    data.mkdir(parents=True)
    (data / "w.bin").write_bytes(b"weights")
    raised: list[UserInputError] = []
    with http_remote(tmp_path / "remote", login=("vlmops", PASSWORD)) as host:
        pushed = DvcStore(tmp_path / "ws", "http", f"http://vlmops:{PASSWORD}@{host}/dvc").track(data)
        refused = rf"^the DVC remote http://vlmops:\*\*\*@{host}/dvc refused the login of user 'vlmops' \(HTTP 401 "
        with pytest.raises(UserInputError, match=refused) as pull:
            pull_tracked(pushed.md5, "model", f"http://vlmops:{wrong}@{host}/dvc", tmp_path / "pulled")
        (data / "more.bin").write_bytes(b"more weights")
        with pytest.raises(UserInputError, match=refused) as push:
            DvcStore(tmp_path / "ws", "http", f"http://vlmops:{wrong}@{host}/dvc").track(data)
        anonymous = rf"^the DVC remote http://{host}/dvc refused a request without a login \(HTTP 401 Unauthorized"
        with pytest.raises(UserInputError, match=anonymous) as without:
            pull_tracked(pushed.md5, "model", f"http://{host}/dvc", tmp_path / "anonymous")
        raised += [pull.value, push.value, without.value]
        assert all(_login_fix(host) in str(e) for e in raised)
    for error in raised:
        assert not isinstance(error, ServiceUnavailable) and not is_transient(error)
        assert unreachable_service(error) is None
        assert wrong not in str(error) and PASSWORD not in str(error)


def test_an_http_remote_that_answers_403_names_both_readings_not_a_refused_login(tmp_path: Path) -> None:
    """A 403 is no refused login: a server that hides what a login may not see answers 403 for a missing object too
    (S3 and servers like it, to a login that may not list the bucket). A pull and a push that get 403 say the remote
    refused the request and name both readings and both fixes (the login, or the copy); input to fix (exit 2), not
    retried. They said `refused the login of user 'vlmops'`."""
    from vlmops.dvc_remote_failures import RemoteAccessRefused, RemoteLoginRefused
    from vlmops.outages import is_transient, unreachable_service

    host, raised_both = _pull_and_push_answered(tmp_path, 403, RemoteAccessRefused)
    for raised in raised_both:
        message = str(raised)
        assert message.startswith(
            f"the DVC remote http://vlmops:***@{host}/dvc refused a request with the login of user 'vlmops' "
            "(HTTP 403 Forbidden; "
        ), message
        assert (
            "either the login lacks access to what was asked for, or that is missing and the server hides it" in message
        )
        assert _login_fix(host) in message
        assert message.endswith(
            "if it has that access, the remote's copy is missing: push it again from the DVC repository that tracked "
            "it (`dvc push` there), or point versioning.remote_url at a remote that has it"
        )
        assert not isinstance(raised, RemoteLoginRefused) and raised.exit_code == 2
        assert not is_transient(raised) and unreachable_service(raised) is None
        assert PASSWORD not in message


def test_a_pulled_folder_keeps_no_password_and_dvc_pulls_there_with_the_login_given_as_dvc_takes_it(
    tmp_path: Path,
) -> None:
    """A pull from an http remote behind basic auth gives DVC the login for the pull alone: the folder it leaves (a DVC
    repository the user may copy or hand on) holds no password, nor does one a failed pull left. The versioning
    repository that pushed keeps it in its git-ignored `.dvc/config.local` (as before). A `dvc pull` in the pulled
    folder works once the login is given there as README says (`dvc remote modify --local origin ...`)."""
    import subprocess
    import sys

    from vlmops.versioning import DvcPullError, pull_tracked

    workspace = tmp_path / "ws"
    (workspace / "model").mkdir(parents=True)
    (workspace / "model" / "w.bin").write_bytes(b"weights " * 100)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    with http_remote(tmp_path / "remote", login=("vlmops", PASSWORD)) as host:
        url = f"http://vlmops:{PASSWORD}@{host}/dvc"
        version = DvcStore(workspace, "http", url).track(workspace / "model")
        assert _files_holding(workspace, PASSWORD) == [".dvc/config.local"]

        pulled = pull_tracked(version.md5, "model", url, tmp_path / "pulled")
        assert (pulled / "w.bin").read_bytes() == b"weights " * 100
        assert _files_holding(tmp_path / "pulled", PASSWORD) == []
        with pytest.raises(DvcPullError):
            pull_tracked(MISSING_MD5, "model", url, tmp_path / "failed")
        assert (tmp_path / "failed" / ".dvc").is_dir()
        assert _files_holding(tmp_path / "failed", PASSWORD) == []

        shutil.rmtree(pulled)
        shutil.rmtree(tmp_path / "pulled" / ".dvc" / "cache")
        for option, value in (("auth", "basic"), ("user", "vlmops"), ("password", PASSWORD)):
            subprocess.run(
                [*dvc, "remote", "modify", "--local", "origin", option, value], cwd=pulled.parent, check=True
            )
        subprocess.run([*dvc, "pull", "-q", "model.dvc"], cwd=pulled.parent, check=True, capture_output=True)
    assert (pulled / "w.bin").read_bytes() == b"weights " * 100
