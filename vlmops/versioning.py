"""DVC helpers: track a dataset snapshot or a model folder, push it, and report its hash.

DVC commands in one repository must not overlap (they fail on the repo lock), so every operation holds
a file lock beside the repository for its whole duration; two pipeline runs on one machine queue up.

A remote that does not answer (an S3 endpoint down, an http(s) remote's host) is named as such: `ServiceUnavailable` of
the DVC remote, from the client's error, which a retry may fix; so is one that refuses the login (`RemoteLoginRefused`,
a wrong password: the user's to fix) and one that refuses access to a login it took (`RemoteAccessRefused`, HTTP 403:
a login without the access, or a missing object the server hides). See vlmops.dvc_remote_failures.

A model is stored once in the shared store: the DVC remote. The repository's cache links its files into the
workspace (hardlinks, so a tracked folder and its cache entry are the same bytes on disk), and the registry
points at the pushed copy through a small pointer (`write_pointer`) that `checkout_pointer` pulls back.

A password in the remote's URL (`https://user:password@host/dvc`, DVC's http remote with basic auth) is never written
down: what vlmops records (the pointer, the model version's tag `dvc.remote`, `lineage.json`) holds the URL with it
masked (`redact_uri`), and DVC is given it as its http remote's `auth`/`user`/`password` options: for the length of the
operation, in the config the `Repo` doing it is opened with (held in memory, `Repo(config=...)`), and, for the
versioning repository (`DvcStore`) alone, in its `.dvc/config.local` (git-ignored by `dvc init`: DVC's place for
credentials, so that `dvc push` and `dvc status -c` work there by hand), never in `.dvc/config`, which a repository
commits. A pull writes it nowhere: the folder it leaves (a DVC repository, `pull_tracked`) may be copied or handed on,
so a `dvc pull` there later needs the login given as DVC takes it (`dvc remote modify --local origin password ...`). A
pull of a recorded URL takes the password from the config's `versioning.remote_url` when that names the same remote
(`with_password`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmops.config import dvc_url_login_refused
from vlmops.dvc_remote_failures import NOT_WITH_SET, remote_failures_named
from vlmops.errors import RunFailed, UserInputError
from vlmops.redact import MASK, redact_uri, uri_login
from vlmops.staging import held_lock

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 3600
# Hardlinks, not copies: `dvc add` of a 15 GB model must not leave a second 15 GB beside it. DVC makes linked
# files read-only, so a tracked folder is never edited in place (a rerun writes a new folder and tracks it).
CACHE_LINK_TYPE = "hardlink"
POINTER_FILE = "vlmops_dvc_pointer.json"


@dataclass(frozen=True)
class DvcVersion:
    """A tracked output: its .dvc file and the content hash DVC recorded (`.dir` suffix for folders); `remote_url` as
    vlmops records it, any password masked."""

    path: str
    dvc_file: str
    md5: str
    size: int
    nfiles: int | None
    remote: str
    remote_url: str = ""


class DvcStore:
    """One DVC repository (created on first use) with a default remote."""

    def __init__(self, repo_root: str | os.PathLike[str], remote_name: str, remote_url: str):
        self.root = Path(repo_root).expanduser().resolve()
        self.remote_name = remote_name
        self.remote_url = _absolute_url(remote_url)
        self.lock_file = self.root.parent / f".{self.root.name}.dvc.lock"

    def writes(self) -> list[Path]:
        """What DVC writes besides the tracked paths and their .dvc files: the repository's .dvc folder (its cache,
        its tmp) and .dvcignore, the lock beside the repository, and a remote in a local folder. A cache key that
        fingerprints a folder holding the repository (a dataset in the checkout that is versioning.repo) leaves
        these out: every run writes them."""
        paths = [self.root / ".dvc", self.root / ".dvcignore", self.lock_file]
        if "://" not in self.remote_url:
            paths.append(Path(self.remote_url))
        return paths

    def _open(self) -> Any:
        from dvc.repo import Repo

        os.environ.setdefault("DVC_NO_ANALYTICS", "1")
        if not (self.root / ".dvc").is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            # no_scm: the repository is a data workspace; its .dvc files are logged to MLflow and kept beside
            # the data, so it needs no git repository of its own.
            Repo.init(str(self.root), no_scm=not (self.root / ".git").exists())
            log.info("initialised a DVC repository at %s", self.root)
        login = _configure(self.root, self.remote_name, self.remote_url, keep_login=True)
        return Repo(str(self.root), config=login)

    def track(self, path: str | os.PathLike[str]) -> DvcVersion:
        """`dvc add` then `dvc push` one folder or file inside the repository.

        Raises:
            ServiceUnavailable: the remote did not answer (a retry pushes what is missing).
            RemoteLoginRefused: the remote refused the login (HTTP 401; S3's 403 for keys it does not know).
            RemoteAccessRefused: the remote answered 403 to a login it took.
        """
        target = Path(path).resolve()
        if not target.is_relative_to(self.root):
            raise ValueError(
                f"{target} is outside the DVC repository {self.root}: set versioning.repo to a folder that "
                "contains run.output_dir (or leave it null to use run.output_dir)"
            )
        with held_lock(self.lock_file, f"versioning into the DVC repository {self.root}", LOCK_TIMEOUT_S):
            repo = self._open()
            try:
                repo.add([str(target)])
                dvc_file = target.with_name(target.name + ".dvc")
                login, listing = _basic_login(repo, self.remote_name), _lister(repo, self.remote_name)
                with remote_failures_named(self.remote_url, login, listing):
                    repo.push(targets=[str(dvc_file)], remote=self.remote_name)
                    # The pointer registered later must name a complete copy: check the remote has every object.
                    missing = repo.status(targets=[str(dvc_file)], cloud=True, remote=self.remote_name)
            finally:
                repo.close()
        if missing:
            raise RunFailed(
                f"DVC: after the push, the remote {self.remote_name} ({redact_uri(self.remote_url)}) still lacks "
                f"objects of {target.name}: {missing}; run the step again (a push resumes with what is missing)"
            )
        version = read_dvc_file(dvc_file, self.remote_name, redact_uri(self.remote_url))
        log.info("DVC: %s -> %s (pushed to %s)", target.name, version.md5, self.remote_name)
        return version


def read_dvc_file(dvc_file: Path, remote: str = "", remote_url: str = "") -> DvcVersion:
    data = yaml.safe_load(dvc_file.read_text())
    out = data["outs"][0]
    return DvcVersion(
        path=str(dvc_file.with_suffix("")),
        dvc_file=str(dvc_file),
        md5=str(out["md5"]),
        size=int(out.get("size", 0)),
        nfiles=out.get("nfiles"),
        remote=remote,
        remote_url=remote_url,
    )


def write_pointer(version: DvcVersion, folder: Path) -> Path:
    """A small file that says where the pushed copy of a tracked folder is: its .dvc file and the remote URL.

    Registering this instead of the folder itself keeps one copy of a model in the shared store.
    """
    if not version.remote_url:
        raise ValueError(f"{version.dvc_file}: no remote URL recorded; track it with DvcStore.track")
    folder.mkdir(parents=True, exist_ok=True)
    pointer = folder / POINTER_FILE
    record = {
        "md5": version.md5,
        "name": Path(version.path).name,
        "remote_url": version.remote_url,
        "dvc_file": Path(version.dvc_file).read_text(),
    }
    pointer.write_text(json.dumps(record, indent=2) + "\n")
    return pointer


def checkout_pointer(pointer: Path, dest: Path, config_remote_url: str | None = None) -> Path:
    """Pull the folder a pointer names from its DVC remote into `dest/<name>`; returns that folder.

    A throwaway DVC repository in `dest` does the pull (so any remote DVC supports works), and its cache is
    removed afterwards: the files are hardlinked out of it first, so `dest` keeps one copy.

    Args:
        config_remote_url: the config's `versioning.remote_url`: the password of the pointer's remote, when it is this
            one (`with_password`).

    Raises:
        ValueError: the pointer file is not one `write_pointer` wrote.
        UserInputError: the pointer's remote needs a password and `config_remote_url` does not give it.
        DvcPullError: the remote's copy is missing or fails its hash check.
        ServiceUnavailable: the remote did not answer.
        RemoteLoginRefused: the remote refused the login (HTTP 401; S3's 403 for keys it does not know).
        RemoteAccessRefused: the remote answered 403 to a login it took: it lacks access, or the copy is missing.
    """
    try:
        record = json.loads(pointer.read_text())
        name, dvc_text, remote_url = record["name"], record["dvc_file"], record["remote_url"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{pointer}: not a vlmops DVC pointer ({err}); register the model again") from err
    remote_url = with_password(remote_url, config_remote_url)
    dvc_file = _pull(dest, name, dvc_text, remote_url, str(record.get("md5")))
    for leftover in (".dvc", ".dvcignore", dvc_file.name):
        target = dest / leftover
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    return dest / name


def pull_tracked(md5: str, name: str, remote_url: str, dest: Path) -> Path:
    """Restore the folder DVC recorded as `md5` from `remote_url` into `dest/<name>`; returns that folder.

    `dest` stays a DVC repository with `<name>.dvc` and the remote configured, so `dvc status` or `dvc pull`
    there check or redo it; not the remote's login, which the pull gives DVC in memory only (for an http(s) remote
    behind one, `dvc remote modify --local origin auth basic`, then `user` and `password`, give it there). The same
    as, in an empty folder:

        dvc init --no-scm && dvc remote add -d origin REMOTE_URL && dvc remote modify origin verify true
        printf 'outs:\n- md5: MD5\n  hash: md5\n  path: NAME\n' > NAME.dvc && dvc pull NAME.dvc

    Raises:
        UserInputError: `dest/<name>` exists already; `remote_url` is a recorded one whose password is masked.
        DvcPullError: the remote's copy is missing or fails its hash check.
        ServiceUnavailable: the remote did not answer.
        RemoteLoginRefused: the remote refused the login (HTTP 401; S3's 403 for keys it does not know).
        RemoteAccessRefused: the remote answered 403 to a login it took: it lacks access, or the copy is missing.
    """
    if (dest / name).exists():
        raise UserInputError(f"{dest / name} exists already: remove it or pull into an empty folder")
    dvc_text = yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": name}]}, sort_keys=False)
    _pull(dest, name, dvc_text, _absolute_url(remote_url), md5)
    return dest / name


class DvcPullError(RunFailed):
    """A tracked folder could not be restored whole from the DVC remote."""


def with_password(recorded_url: str, config_remote_url: str | None) -> str:
    """The remote URL to pull from, for one vlmops recorded (its password masked): the config's
    `versioning.remote_url`, password and all, where that names the same remote (the same URL once masked); else the
    recorded one as it is (`_configure` then takes the password from DVC's own config, or says where to give it)."""
    if config_remote_url and redact_uri(_absolute_url(config_remote_url)) == recorded_url:
        return _absolute_url(config_remote_url)
    return recorded_url


def _pull(dest: Path, name: str, dvc_text: str, remote_url: str, md5: str) -> Path:
    """Write `<name>.dvc` into a DVC repository at `dest` with `remote_url` as its remote, and pull it.

    The remote is set to `verify: true`: DVC then hashes every file it downloads and refuses one whose content
    is not its name (by default it trusts the remote), so a damaged object fails here instead of loading.
    """
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / ".dvc").is_dir():
        Repo.init(str(dest), no_scm=True)
    # The login in memory only: the folder is the user's, to copy or hand on (a crash mid-pull leaves no password).
    login = _configure(dest, "origin", remote_url, keep_login=False)
    dvc_file = dest / f"{name}.dvc"
    dvc_file.write_text(dvc_text)
    repo = Repo(str(dest), config=login)
    try:
        log.info("DVC: pulling %s (%s) from %s", name, md5, redact_uri(remote_url))
        with remote_failures_named(remote_url, _basic_login(repo, "origin"), _lister(repo, "origin")):
            repo.pull(targets=[str(dvc_file)], remote="origin")
    except CheckoutError as err:
        raise DvcPullError(
            f"DVC could not restore {name} ({md5}) from {redact_uri(remote_url)}: the remote's copy is missing or damaged "
            f"(a file's content does not match its recorded hash). Push it again from a machine that has it "
            f"(`dvc push` in the DVC repository that tracked it), or point versioning.remote_url at a good copy"
        ) from err
    finally:
        repo.close()
    return dvc_file


def cache_object_path(remote_dir: Path, md5: str) -> Path:
    """Where a DVC 3 local remote keeps the object with this hash."""
    return remote_dir / "files" / "md5" / md5[:2] / md5[2:]


# The remote's options that `_configure` sets from a login in its URL; DVC's http remote reads them.
CREDENTIAL_KEYS = ("auth", "user", "password")


def _configure(root: Path, remote_name: str, remote_url: str, *, keep_login: bool) -> dict[str, Any]:
    """Set the default remote and the cache link type in the repository's config file; returns the config the `Repo`
    that does the work is to be opened with (`Repo(config=...)`, merged over DVC's files in memory): a login in the URL
    as the remote's credentials. `keep_login`: write that login to `.dvc/config.local` too (the versioning repository,
    where DVC's own commands then work); a login there for another URL goes either way.

    Done before the `Repo` that does the work is opened: a `Repo` reads the cache settings once, so an edit
    through an open one would apply only to the next.

    Raises:
        UserInputError: `remote_url` holds a password DVC's remote would not read (`dvc_url_login_refused`), or is a
            recorded URL whose password is masked and DVC's config has none for the remote.
    """
    from dvc.repo import Repo

    if refused := dvc_url_login_refused(remote_url):
        raise UserInputError(f"versioning.remote_url: {refused}")
    login = uri_login(remote_url)
    # Without the userinfo: aiohttp refuses a URL's login beside the `auth` DVC gives it.
    url = login.uri if login else remote_url
    repo = Repo(str(root))
    try:
        with repo.config.edit() as conf:  # .dvc/config: a repository commits it
            remote = conf["remote"].get(remote_name, {})
            moved = remote.get("url") != url
            if moved:  # a fresh section (also where an older vlmops wrote the URL with its password)
                conf["remote"][remote_name] = {"url": url}
            # DVC trusts what it downloads unless told to hash it: a damaged object would load silently.
            conf["remote"][remote_name]["verify"] = True
            conf.setdefault("core", {})["remote"] = remote_name
            conf.setdefault("cache", {})["type"] = CACHE_LINK_TYPE
        given: dict[str, str] = {}
        if login is not None:
            given = {"auth": "basic", "user": login.user}
            if login.password != MASK:
                given["password"] = login.password
        with repo.config.edit("local") as local:  # .dvc/config.local: git-ignored, DVC's place for credentials
            credentials = local["remote"].get(remote_name, {})
            if moved:  # a login for another URL is not sent to this one
                credentials = {k: v for k, v in credentials.items() if k not in CREDENTIAL_KEYS}
            if keep_login:
                credentials.update(given)
            if credentials:
                local["remote"][remote_name] = credentials
            else:
                local["remote"].pop(remote_name, None)
        if login is not None and not (given.get("password") or repo.config["remote"][remote_name].get("password")):
            raise UserInputError(
                f"the DVC remote {remote_url} needs its password, which vlmops never records: set "
                f"versioning.remote_url in the config file to this URL with the password in place of {MASK} "
                f"{NOT_WITH_SET}"
            )
    finally:
        repo.close()
    return {"remote": {remote_name: given}} if given else {}


def _lister(repo: Any, remote_name: str) -> Callable[[], object]:
    """A listing of the remote `remote_name` of the open `repo` (its root, one level), with the credentials DVC uses:
    after a 403, what tells a refused login from a lack of access (`remote_failures_named`)."""

    def list_remote() -> object:
        remote = repo.cloud.get_remote(remote_name)
        return remote.fs.ls(remote.path, detail=False, refresh=True)

    return list_remote


def _basic_login(repo: Any, remote_name: str) -> tuple[str, str] | None:
    """The user and password DVC sends the remote `remote_name` of the open `repo` (its http remote's basic auth, as
    `_configure` sets it from the URL, or set by hand in DVC's config); None where it sends none."""
    remote = repo.config["remote"].get(remote_name, {})
    if remote.get("auth") != "basic":
        return None
    return str(remote.get("user", "")), str(remote.get("password", ""))


def _absolute_url(url: str) -> str:
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())
