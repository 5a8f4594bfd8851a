"""`vlmops pull models:/NAME@champion` from a second clone that has only the config: the exact dataset snapshot
and merged model of that version come back from the DVC remote, hash-checked; a damaged remote copy fails with
a message that says so; the documented `dvc pull` does the same."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.http_remote import http_remote
from tests.registry.conftest import NAME, Registry
from tests.s3_server import S3Server
from vlmops.cli.main import main
from vlmops.versioning import cache_object_path

PASSWORD = "s3cret-dvc-pw"

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def champion(registry: Registry) -> str:
    """Version 1 (model A) registered by the flow's code path and made champion."""
    version = registry.register("a").version
    registry_client(registry).set_registered_model_alias(NAME, "champion", version)
    return version


def registry_client(registry: Registry):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=registry.config.tracking.uri, registry_uri=registry.config.tracking.uri)


def clone(registry: Registry, folder: Path, **extra: object) -> Path:
    """A second checkout: nothing but a config naming the team's tracking server (here the same SQLite store)."""
    folder.mkdir()
    config = {"tracking": {"uri": registry.config.tracking.uri, "experiment": "registry-test"}, **extra}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_pull_restores_exactly_the_champion_in_a_second_clone(
    registry: Registry,
    champion: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dvc.repo import Repo

    second = clone(registry, tmp_path / "second")
    monkeypatch.chdir(second)
    assert main(["pull", f"models:/{NAME}@champion", "--config", "pipeline.yaml"]) == 0
    pulled = second / "outputs" / "pulled" / f"{NAME}-v{champion}"
    assert digests(pulled / "dataset") == digests(registry.snapshot_copy)
    assert digests(pulled / "model") == digests(registry.model_a)
    lineage = json.loads((pulled / "lineage.json").read_text())
    assert lineage["version"] == champion
    assert lineage["tags"]["dvc.model.md5"] == registry.versions["a"].md5
    assert lineage["tags"]["dvc.dataset.md5"] == registry.data_version.md5
    assert f"model     {pulled / 'model'}  ({registry.versions['a'].md5})" in capsys.readouterr().out
    repo = Repo(str(pulled))  # the folder is a DVC repository whose .dvc files match what is there
    try:
        assert repo.status() == {}
    finally:
        repo.close()


def test_the_documented_dvc_pull_restores_the_same(registry: Registry, champion: str, tmp_path: Path) -> None:
    """README's recipe: the version's dvc.model.md5 tag and remote, a two-line .dvc file, `dvc pull`."""
    tags = registry_client(registry).get_model_version(NAME, champion).tags
    dvc = [str(Path(sys.executable).parent / "dvc")]
    folder = tmp_path / "by-hand"
    folder.mkdir()
    for args in (
        ["init", "--no-scm", "-q"],
        ["remote", "add", "-d", "origin", tags["dvc.remote"]],
        ["remote", "modify", "origin", "verify", "true"],
    ):
        subprocess.run(dvc + args, cwd=folder, check=True, capture_output=True)
    (folder / "model.dvc").write_text(f"outs:\n- md5: {tags['dvc.model.md5']}\n  hash: md5\n  path: model\n")
    subprocess.run([*dvc, "pull", "model.dvc"], cwd=folder, check=True, capture_output=True)
    assert digests(folder / "model") == digests(registry.model_a)


def test_a_damaged_remote_copy_fails_clearly(
    registry: Registry, champion: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged-remote"
    shutil.copytree(registry.remote, damaged)
    weights = hashlib.md5((registry.model_a / "model.safetensors").read_bytes()).hexdigest()
    target = cache_object_path(damaged, weights)
    target.chmod(0o644)
    target.write_bytes(b"not the weights")
    second = clone(registry, tmp_path / "second")
    code = main(
        [
            "pull",
            f"models:/{NAME}@champion",
            "--config",
            str(second / "pipeline.yaml"),
            "--set",
            f"versioning.remote_url={damaged}",
            "--out",
            str(second / "pulled"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"DVC could not restore model ({registry.versions['a'].md5}) from {damaged}" in err
    assert "missing or damaged" in err
    assert not (second / "pulled" / f"{NAME}-v{champion}" / "model").exists()


def test_pull_refuses_what_it_cannot_restore(
    registry: Registry, champion: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmops.tracking import Tracker

    tracker = Tracker(registry.config.tracking)
    with tracker.run("plain") as run_id:
        tracker.register_model(run_id, registry.model_b, "vlmops-plain", "champion")
    config = str(clone(registry, tmp_path / "second") / "pipeline.yaml")
    assert main(["pull", "models:/vlmops-plain@champion", "--config", config, "--out", str(tmp_path)]) == 2
    assert "registered without DVC versioning" in capsys.readouterr().err
    assert main(["pull", f"models:/{NAME}@nobody", "--config", config, "--out", str(tmp_path)]) == 2
    assert f"models:/{NAME}@nobody: not found in the registry" in capsys.readouterr().err


def test_pull_into_a_taken_target_is_an_input_error_of_one_line(
    registry: Registry, champion: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target that holds files, or is a file, is refused up front (exit 2, one line naming it and the fix); the file
    case raised a bare NotADirectoryError, which the CLI printed as a traceback."""
    config = str(clone(registry, tmp_path / "second") / "pipeline.yaml")
    target = tmp_path / "out" / f"{NAME}-v{champion}"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    assert main(["pull", f"models:/{NAME}@champion", "--config", config, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {target} is not empty: ") and "(--out)" in err and err.count("\n") == 1, err
    shutil.rmtree(target)
    target.write_text("a file where the folder goes")
    assert main(["pull", f"models:/{NAME}@champion", "--config", config, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {target} is a file: ") and "(--out)" in err and err.count("\n") == 1, err


def test_pull_tracked_into_a_taken_folder_is_an_input_error(tmp_path: Path) -> None:
    """The folder a tracked copy goes to exists already: a UserInputError (exit 2 in the CLI), not a bare
    FileExistsError that the CLI shows as a traceback."""
    from vlmops.errors import UserInputError
    from vlmops.versioning import pull_tracked

    (tmp_path / "dataset").write_text("a file where the folder goes")
    with pytest.raises(UserInputError, match=r"dataset exists already: remove it or pull into an empty folder$"):
        pull_tracked("0" * 32 + ".dir", "dataset", str(tmp_path / "remote"), tmp_path)


def test_pull_from_an_s3_remote_checks_every_object(s3_env: S3Server, tmp_path: Path) -> None:
    """The team's remote is S3 (SeaweedFS here): the same pull, and the same refusal of a damaged object."""
    from vlmops.versioning import DvcPullError, DvcStore, pull_tracked

    s3 = s3_env.client()
    s3.create_bucket(Bucket="dvc-pull")
    workspace = tmp_path / "workspace"
    (workspace / "model").mkdir(parents=True)
    (workspace / "model" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (workspace / "model" / "config.json").write_text('{"a": 1}')
    pushed = DvcStore(workspace, "team", "s3://dvc-pull/dvc").track(workspace / "model")

    restored = pull_tracked(pushed.md5, "model", "s3://dvc-pull/dvc", tmp_path / "clone")
    assert digests(restored) == digests(workspace / "model")

    weights = hashlib.md5((workspace / "model" / "weights.bin").read_bytes()).hexdigest()
    s3.put_object(Bucket="dvc-pull", Key=f"dvc/files/md5/{weights[:2]}/{weights[2:]}", Body=b"damaged")
    with pytest.raises(DvcPullError, match=r"DVC could not restore model \(.*\) from s3://dvc-pull/dvc"):
        pull_tracked(pushed.md5, "model", "s3://dvc-pull/dvc", tmp_path / "second-clone")


S3_FIX = (
    "give DVC's S3 remote keys that may list and read (and, for a push, write) it: AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY in the environment (with AWS_SESSION_TOKEN for temporary keys, renewed once they expire), "
    "or a profile of the AWS config (AWS_PROFILE)"
)


def _pushed(s3_env: S3Server, tmp_path: Path, bucket: str) -> tuple[Path, str]:
    """A model folder pushed to `s3://BUCKET/dvc` with the keys allowed everything: the workspace and its hash."""
    from vlmops.versioning import DvcStore

    s3_env.client().create_bucket(Bucket=bucket)
    workspace = tmp_path / "workspace"
    (workspace / "model").mkdir(parents=True)
    (workspace / "model" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return workspace, DvcStore(workspace, "team", f"s3://{bucket}/dvc").track(workspace / "model").md5


def test_an_s3_remote_that_refuses_the_credentials_says_so(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys the S3 server does not take (a wrong secret, an unknown key): DVC said `1 files failed to download` (a
    pull) or a bare `Forbidden` (a push), naming neither the remote nor the fix. S3 answers them 403, as it does keys it
    takes that lack access; DVC's HEAD requests get no body saying which, so the remote's listing is asked with the same
    keys, whose answer names them (SignatureDoesNotMatch, InvalidAccessKeyId). It is the credentials the remote refused,
    named with the remote, the status and where DVC's S3 remote reads them; a bad input (exit 2), not retried."""
    from vlmops.dvc_remote_failures import RemoteLoginRefused
    from vlmops.outages import is_transient
    from vlmops.versioning import DvcStore, pull_tracked

    workspace, md5 = _pushed(s3_env, tmp_path, "dvc-refused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    refused = r"^the DVC remote s3://dvc-refused/dvc refused the credentials \(HTTP 403 Forbidden; ClientError: "
    with pytest.raises(RemoteLoginRefused, match=refused + r".*\(SignatureDoesNotMatch\)") as pull:
        pull_tracked(md5, "model", "s3://dvc-refused/dvc", tmp_path / "clone")
    (workspace / "model" / "more.bin").write_bytes(b"more weights")
    with pytest.raises(RemoteLoginRefused, match=refused + r".*\(SignatureDoesNotMatch\)") as push:
        DvcStore(workspace, "team", "s3://dvc-refused/dvc").track(workspace / "model")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-has-this-key")
    with pytest.raises(RemoteLoginRefused, match=refused + r".*\(InvalidAccessKeyId\)") as unknown:
        pull_tracked(md5, "model", "s3://dvc-refused/dvc", tmp_path / "unknown")
    for raised in (pull.value, push.value, unknown.value):
        assert str(raised).endswith(S3_FIX)
        assert raised.exit_code == 2 and not is_transient(raised)
        assert "not-the-secret" not in str(raised)


def test_a_temporary_login_the_s3_remote_does_not_take_is_a_refused_login(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temporary keys (AWS_SESSION_TOKEN): a session token the server does not know (SeaweedFS then looks the keys up
    as temporary ones, InvalidAccessKeyId) and one AWS calls expired (ExpiredToken, answered 400, which no local server
    gives: the client's own error for it) are a refused login, whose fix names the session token; not a retry."""
    from botocore.exceptions import ClientError

    from vlmops.dvc_remote_failures import RemoteLoginRefused, remote_failures_named
    from vlmops.outages import is_transient
    from vlmops.versioning import pull_tracked

    _, md5 = _pushed(s3_env, tmp_path, "dvc-token")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-token-nobody-issued")
    with pytest.raises(RemoteLoginRefused, match=r"refused the credentials .*\(InvalidAccessKeyId\)") as unknown:
        pull_tracked(md5, "model", "s3://dvc-token/dvc", tmp_path / "clone")
    expired = ClientError(
        {
            "Error": {"Code": "ExpiredToken", "Message": "The provided token has expired."},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        },
        "HeadObject",
    )
    late_match = r"\(HTTP 400 Bad Request; .*ExpiredToken"
    with pytest.raises(RemoteLoginRefused, match=late_match) as late, remote_failures_named("s3://dvc-token/dvc"):
        raise PermissionError("Forbidden") from expired
    for raised in (unknown.value, late.value):
        assert str(raised).endswith(S3_FIX) and "AWS_SESSION_TOKEN" in S3_FIX
        assert raised.exit_code == 2 and not is_transient(raised)


def test_an_s3_remote_that_answers_403_to_keys_it_takes_says_what_that_can_mean(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys the S3 server takes that lack access: not a refused login (which they read as before). Keys that may
    neither read nor list (`Write` alone): the object asked for may be missing too (S3 answers 403 for a missing
    object to keys that may not list the bucket), so the error names both readings and both fixes. Keys that may
    list but not read (`List` alone), or not write, for a push: a missing object would be 404 to them, so it is their
    access. Input to fix (exit 2), not retried."""
    from tests.s3_server import LIMITED
    from vlmops.dvc_remote_failures import RemoteAccessRefused, RemoteLoginRefused
    from vlmops.outages import is_transient
    from vlmops.versioning import DvcStore, pull_tracked

    workspace, md5 = _pushed(s3_env, tmp_path, "dvc-forbidden")
    url = "s3://dvc-forbidden/dvc"
    head = rf"^the DVC remote {url} refused a request with the credentials \(HTTP 403 Forbidden; "
    raised: list[RemoteAccessRefused] = []
    for actions in ("Write", "List"):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", LIMITED[actions].access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LIMITED[actions].secret_key)
        with pytest.raises(RemoteAccessRefused, match=head) as pull:
            pull_tracked(md5, "model", url, tmp_path / f"clone-{actions}")
        raised.append(pull.value)
    (workspace / "model" / "more.bin").write_bytes(b"more weights")
    with pytest.raises(RemoteAccessRefused, match=head) as push:
        DvcStore(workspace, "team", url).track(workspace / "model")
    raised.append(push.value)

    write_only, list_only, list_only_push = (str(e) for e in raised)
    assert (
        "either the login lacks access to what was asked for (it may not list the remote either), or that is missing "
        "and the server hides it" in write_only
    )
    assert write_only.endswith(
        f"{S3_FIX}; if it has that access, the remote's copy is missing: push it again from the DVC repository that "
        "tracked it (`dvc push` there), or point versioning.remote_url at a remote that has it"
    )
    for message in (list_only, list_only_push):
        assert (
            "the login may list the remote but lacks access to what was asked for (were that only missing, the answer "
            f"would be 404 Not Found): {S3_FIX}" in message
        )
        assert message.endswith(S3_FIX)
    assert [e.may_list for e in raised] == [False, True, True]
    for error in raised:
        assert not isinstance(error, RemoteLoginRefused)
        assert error.exit_code == 2 and not is_transient(error)


def test_a_remote_behind_a_password_is_pulled_with_the_configs_and_records_it_nowhere(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The team's DVC remote is an http server behind basic auth, its login in versioning.remote_url. What is
    recorded (the version's tag dvc.remote, its pointer, the MLflow store, lineage.json) holds the URL with the
    password masked; `vlmops pull` in a clone whose config gives the URL with its password restores the version, in
    one whose config does not, says where to give it (exit 2) instead of calling the remote's copy missing, and in one
    whose config gives a wrong password, says the remote refused the login (exit 2)."""
    from vlmops.data.prepare import snapshot_hash
    from vlmops.registry.lineage import version_tags
    from vlmops.tracking import Tracker
    from vlmops.versioning import DvcStore, write_pointer

    workspace = tmp_path / "outputs"
    shutil.copytree(registry.snapshot_copy, workspace / "dataset")
    shutil.copytree(registry.model_a, workspace / "model")
    with http_remote(tmp_path / "remote", login=("vlmops", PASSWORD)) as host:
        url = f"http://vlmops:{PASSWORD}@{host}/dvc"
        store = DvcStore(workspace, "team", url)
        data, model = store.track(workspace / "dataset"), store.track(workspace / "model")
        tracker = Tracker(registry.config.tracking)
        with tracker.run("register-http") as run_id:
            tags = version_tags(
                config=registry.config,
                run={"git_commit": "test", "mlflow_run_id": run_id},
                base_model={"id": "tiny", "revision": None, "source": "local", "manifest_hash": "test"},
                dataset_path=str(workspace / "dataset"),
                dataset_hash=snapshot_hash(registry.snapshot_copy),
                data_version=data,
                model_version=model,
            )
            write_pointer(model, tmp_path / "pointer")
            version = tracker.register_model(run_id, tmp_path / "pointer", "vlmops-http", "champion", tags=tags).version
        assert registry_client(registry).get_model_version("vlmops-http", version).tags["dvc.remote"] == (
            f"http://vlmops:***@{host}/dvc"
        )
        shutil.rmtree(workspace / "dataset")  # only the remote has them now
        shutil.rmtree(workspace / "model")

        with_login = clone(registry, tmp_path / "with-login", versioning={"remote_url": url})
        out = ["--out", str(tmp_path / "pulled")]
        assert main(["pull", "models:/vlmops-http@champion", "--config", str(with_login / "pipeline.yaml"), *out]) == 0
        pulled = tmp_path / "pulled" / f"vlmops-http-v{version}"
        assert digests(pulled / "model") == digests(registry.model_a)
        assert digests(pulled / "dataset") == digests(registry.snapshot_copy)
        assert (
            json.loads((pulled / "lineage.json").read_text())["tags"]["dvc.remote"] == f"http://vlmops:***@{host}/dvc"
        )

        without = clone(registry, tmp_path / "without-login")
        out = ["--out", str(tmp_path / "not-pulled")]
        assert main(["pull", "models:/vlmops-http@champion", "--config", str(without / "pipeline.yaml"), *out]) == 2
        err = capsys.readouterr().err
        assert f"the DVC remote http://vlmops:***@{host}/dvc needs its password" in err
        assert "set versioning.remote_url in the config file" in err and PASSWORD not in err

        wrong = clone(registry, tmp_path / "wrong-login", versioning={"remote_url": f"http://vlmops:not-it@{host}/dvc"})
        out = ["--out", str(tmp_path / "refused")]
        assert main(["pull", "models:/vlmops-http@champion", "--config", str(wrong / "pipeline.yaml"), *out]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: the DVC remote http://vlmops:***@{host}/dvc refused the login of user 'vlmops' ")
        assert "(HTTP 401 Unauthorized; " in err and "not-it" not in err

    holding = [
        p
        for p in [*registry.root.rglob("*"), *tmp_path.rglob("*")]
        if p.is_file() and PASSWORD in p.read_text(errors="replace")
    ]
    # DVC's git-ignored place for credentials in the repository that pushed; the folder the pull left has none.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in holding) == [
        "outputs/.dvc/config.local",
        "with-login/pipeline.yaml",
    ]
