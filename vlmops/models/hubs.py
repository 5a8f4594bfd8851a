"""Where model files come from: ModelScope, the HF hub, a local folder, an S3 prefix.

Each fetcher returns (folder, manifest path, manifest): it reuses a verified snapshot (with no network; an S3
prefix's listing is read to see whether it changed), or downloads only the files a model needs
(`manifest.ALLOW_PATTERNS`, no `.bin` copies beside safetensors) after checking the disk has room, and writes
the manifest. Failures are `download_errors` with what to do.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vlmops.config import StorageConfig
from vlmops.filenames import safe_name
from vlmops.models.catalog import ResolvedModel
from vlmops.models.diskspace import check_free_space, gb, raise_if_disk_full
from vlmops.models.download_errors import (
    REFRESH_HINT,
    ModelDownloadError,
    ModelFolderNotFoundError,
    ModelNotFoundError,
    TransferFailedError,
)
from vlmops.models.manifest import (
    ALLOW_PATTERNS,
    matches,
    model_files,
    patterns_for,
    read_json_or_none,
    verify,
    write_manifest,
)
from vlmops.staging import build_lock

if TYPE_CHECKING:
    from vlmops.storage import S3Object

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# local folders and tiny models


def local_folder(resolved: ResolvedModel) -> Path:
    """The folder of a `source: local` model; a tiny catalog entry is built there first if it is missing."""
    from vlmops.models.tiny import build_tiny_model

    folder = Path(resolved.id).expanduser()
    entry = resolved.entry
    if not folder.exists() and entry is not None and entry.tiny_variant is not None:
        with build_lock(folder):  # two runs starting at once on one output folder build it once
            if not folder.exists():
                log.info("building %s at %s", entry.name, folder)
                build_tiny_model(folder, variant=entry.tiny_variant)
    if not folder.is_dir():
        raise ModelFolderNotFoundError(f"model folder {folder} does not exist (model.id with model.source: local)")
    return folder


def local_snapshot(resolved: ResolvedModel, cache: Path) -> tuple[Path, Path]:
    """(folder, manifest path): the manifest is keyed by the folder's absolute path, outside the folder."""
    folder = local_folder(resolved)
    key = hashlib.sha1(str(folder.resolve()).encode(), usedforsecurity=False).hexdigest()[:12]
    return folder, cache / "manifests" / "local" / f"{safe_name(folder.name)}-{key}.json"


# --------------------------------------------------------------------------------------------------------
# hubs


class Hub(Protocol):
    """What differs between ModelScope and the HF hub: listing, downloading, the cached path, errors."""

    name: str
    subdir: str

    def list_files(self, repo_id: str, revision: str | None) -> dict[str, int]:
        """{path: size} of every file at this revision."""

    def download(self, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path:
        """Fetch the files matching `patterns` (resuming partial ones); the snapshot folder."""

    def cached(self, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path | None:
        """The snapshot of `patterns` already in `cache`, found with no network; None if there is none."""

    def remove(self, snapshot: Path, cache: Path) -> None:
        """Delete a cached snapshot, so the next download fetches every file again."""

    def explain(self, err: BaseException, repo_id: str, revision: str | None) -> ModelDownloadError | None:
        """The error to show for a failure of this hub's client, None when it is not one we know."""


class ModelScope:
    name, subdir = "ModelScope", "modelscope"

    def list_files(self, repo_id: str, revision: str | None) -> dict[str, int]:
        from modelscope.hub.api import HubApi

        files = HubApi().get_model_files(repo_id, revision=revision, recursive=True)
        return {str(f["Path"]): int(f.get("Size") or 0) for f in files}

    def download(self, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path:
        from modelscope import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), allow_patterns=patterns))

    def cached(self, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path | None:
        from modelscope import snapshot_download
        from modelscope_hub.errors import CacheError

        try:
            path = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=str(cache),
                    allow_patterns=patterns,
                    local_files_only=True,
                )
            )
        except CacheError:
            return None
        return path if path.is_dir() else None

    def remove(self, snapshot: Path, cache: Path) -> None:
        # ModelScope keeps a snapshot as plain files in one folder (no shared blobs), so the folder is all of it.
        shutil.rmtree(snapshot)

    def explain(self, err: BaseException, repo_id: str, revision: str | None) -> ModelDownloadError | None:
        import requests
        from modelscope_hub.errors import NotExistError

        text = str(err)
        if isinstance(err, NotExistError) or (isinstance(err, requests.HTTPError) and "404" in text) or "E1004" in text:
            return _unknown_id(self.name, repo_id, revision)
        if isinstance(err, ConnectionError | requests.ConnectionError | requests.Timeout):
            return _unreachable(self.name, "MODELSCOPE_ENDPOINT", err)
        return None


class HuggingFace:
    name, subdir = "the HF hub", "huggingface"

    def list_files(self, repo_id: str, revision: str | None) -> dict[str, int]:
        from huggingface_hub import HfApi

        # model_info is one request; list_repo_tree pages with retries and takes ~25 s to give up offline
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        return {s.rfilename: int(s.size or 0) for s in info.siblings or []}

    def download(self, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), allow_patterns=patterns))

    def cached(self, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path | None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        # huggingface_hub >= 2 checks the cached snapshot against the repository's file list: pass the same
        # patterns as the download, or the files it skipped count as missing.
        try:
            return Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=str(cache),
                    allow_patterns=patterns,
                    local_files_only=True,
                )
            )
        except LocalEntryNotFoundError:
            return None

    def remove(self, snapshot: Path, cache: Path) -> None:
        from huggingface_hub import scan_cache_dir

        # The HF cache keeps contents in blobs/ behind the snapshot's symlinks and would relink a damaged blob
        # instead of fetching it again: its own cache API deletes the revision with the blobs only it uses.
        scan_cache_dir(cache).delete_revisions(snapshot.name).execute()

    def explain(self, err: BaseException, repo_id: str, revision: str | None) -> ModelDownloadError | None:
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(err, RepositoryNotFoundError | RevisionNotFoundError):
            return _unknown_id(self.name, repo_id, revision)
        if isinstance(err, LocalEntryNotFoundError) or _is_connection_error(err):
            return _unreachable(self.name, "HF_ENDPOINT", err)
        return None


def hub_snapshot(resolved: ResolvedModel, cache: Path, refresh: bool, hub: Hub) -> tuple[Path, Path, dict[str, Any]]:
    """(snapshot, manifest path, manifest) of a hub model: the verified cache, or a (resumed) download.

    One process at a time per model and revision in a cache (a lock beside the manifest): another one that fetches it
    at the same time waits, then uses the snapshot this one verified.
    """
    manifest_path = (
        cache / "manifests" / hub.subdir / safe_name(resolved.id) / f"{safe_name(resolved.revision or 'default')}.json"
    )
    with build_lock(manifest_path, f"fetching {hub.name} {resolved.id}@{resolved.revision} into {cache}"):
        return _hub_snapshot(resolved, cache, refresh, hub, manifest_path)


def _hub_snapshot(
    resolved: ResolvedModel, cache: Path, refresh: bool, hub: Hub, manifest_path: Path
) -> tuple[Path, Path, dict[str, Any]]:
    hub_cache = cache / hub.subdir
    recorded = read_json_or_none(manifest_path)
    patterns = list(recorded.get("allow_patterns", ALLOW_PATTERNS)) if recorded else list(ALLOW_PATTERNS)
    snapshot = hub.cached(resolved.id, resolved.revision, hub_cache, patterns)
    if snapshot is not None and refresh:
        log.info("refresh: removing %s", snapshot)
        hub.remove(snapshot, hub_cache)
        manifest_path.unlink(missing_ok=True)
        snapshot = None
    if snapshot is not None and manifest_path.is_file():
        return snapshot, manifest_path, verify(snapshot, manifest_path, owned=True)

    # Not cached, or an interrupted download (no manifest yet): fetch; the hub clients resume partial files.
    try:
        listing = hub.list_files(resolved.id, resolved.revision)
        patterns = patterns_for(listing)
        wanted = {p: s for p, s in listing.items() if matches(p, patterns)}
        if not wanted:
            raise ModelNotFoundError(
                f"{hub.name} {resolved.id}@{resolved.revision} has no model files "
                f"(nothing matches {', '.join(patterns)}): check model.id"
            )
        present = sum(
            s for p, s in wanted.items() if snapshot and (snapshot / p).is_file() and (snapshot / p).stat().st_size == s
        )
        check_free_space(hub_cache, sum(wanted.values()) - present, f"{hub.name} {resolved.id}")
        log.info(
            "downloading %s %s@%s (%d files, %s)",
            hub.name,
            resolved.id,
            resolved.revision,
            len(wanted),
            gb(sum(wanted.values())),
        )
        snapshot = hub.download(resolved.id, resolved.revision, hub_cache, patterns)
    except ModelDownloadError:
        raise
    except Exception as err:
        raise_if_disk_full(err, hub_cache, "downloading (the next run resumes)")
        explained = hub.explain(err, resolved.id, resolved.revision)
        if explained is not None:
            raise explained from err
        raise
    missing = [p for p in wanted if not (snapshot / p).is_file()]
    if missing:
        raise TransferFailedError(
            f"{hub.name} download of {resolved.id} is missing {', '.join(missing)}; {REFRESH_HINT}"
        )
    manifest = write_manifest(
        snapshot, manifest_path, resolved, files=sorted(wanted), extra={"allow_patterns": patterns}
    )
    return snapshot, manifest_path, manifest


def _unknown_id(hub: str, repo_id: str, revision: str | None) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{hub} has no model {repo_id!r} at revision {revision!r}: check model.id and model.revision "
        "(`vlmops models` lists the catalog's ids)"
    )


def _unreachable(hub: str, env: str, err: BaseException) -> TransferFailedError:
    return TransferFailedError(
        f"{hub} is unreachable ({type(err).__name__}: {str(err)[:200]}). With no network, put the model "
        "files in a folder and set model.source: local and model.id: /path/to/folder, or point "
        "model.cache_dir at a "
        f"cache that already holds this model; to use a mirror, set {env}."
    )


def _is_connection_error(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConnectionError | TimeoutError) or type(seen).__name__ in (
            "ConnectError",
            "ConnectTimeout",
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --------------------------------------------------------------------------------------------------------
# s3


def s3_model_files(uri: str, storage_cfg: StorageConfig | None) -> dict[str, S3Object]:
    """{path relative to the prefix: object} of the model files under `uri` now (one LIST request).

    Raises:
        ModelNotFoundError: nothing under `uri`, or no model files.
        botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError: the bucket cannot be listed.
    """
    from vlmops.storage import list_objects, parse_s3_uri, s3_client

    bucket, prefix = parse_s3_uri(uri)
    objects = list_objects(s3_client(storage_cfg), bucket, prefix)
    if not objects:
        raise ModelNotFoundError(f"no objects under {uri}: check model.id (and storage.endpoint_url)")
    listing = {(o.key[len(prefix) + 1 :] if prefix else o.key): o for o in objects}
    patterns = patterns_for(listing)
    wanted = {rel: o for rel, o in sorted(listing.items()) if matches(rel, patterns)}
    if not wanted:
        raise ModelNotFoundError(f"no model files under {uri} (nothing matches {', '.join(patterns)})")
    return wanted


def s3_snapshot(
    resolved: ResolvedModel, storage_cfg: StorageConfig | None, cache: Path, refresh: bool
) -> tuple[Path, Path, dict[str, Any]]:
    """(folder, manifest path, manifest) of an S3 prefix: the verified copy, or a sync of the model files.

    The copy is reused while the prefix's listing (each model file's key and ETag, one LIST request, which a sync
    copies from without listing again) is the one it was made from: an object rewritten or removed in place is copied
    again (only it) or removed here. With S3 out of reach the verified copy is used as it is, with a warning.

    One process at a time per prefix in a cache (a lock beside the manifest): another one that fetches it at the same
    time (a scheduled retrain and a batch job) waits, then uses the copy this one verified.
    """
    from vlmops.storage import parse_s3_uri

    bucket, prefix = parse_s3_uri(resolved.id)
    folder = cache / "s3" / bucket / prefix
    # The prefix's hash keeps two prefixes whose safe names meet ('a/b' and 'a--b', '' and 'root') apart.
    key = hashlib.sha256(prefix.encode()).hexdigest()[:12]
    manifest_path = cache / "manifests" / "s3" / bucket / f"{safe_name(prefix or 'root')}-{key}.json"
    # Without it both wrote the same hidden .NAME.part files (one could rename the other's away before that one
    # checked it), and one deleted the manifest the other had just written or was reading.
    with build_lock(manifest_path, f"fetching {resolved.id} into {folder}"):
        return _s3_snapshot(resolved, storage_cfg, folder, manifest_path, refresh)


def _s3_snapshot(
    resolved: ResolvedModel, storage_cfg: StorageConfig | None, folder: Path, manifest_path: Path, refresh: bool
) -> tuple[Path, Path, dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError

    from vlmops.storage import CorruptedDownloadError, download_prefix, s3_client

    recorded = read_json_or_none(manifest_path) if folder.is_dir() and not refresh else None
    try:
        wanted = s3_model_files(resolved.id, storage_cfg)
    except (BotoCoreError, ClientError) as err:
        if recorded is None:
            raise _unreadable(resolved.id, err) from err
        log.warning(
            "cannot list %s (%s: %s); using the copy made %s at %s as it is",
            resolved.id,
            type(err).__name__,
            err,
            recorded.get("created", "earlier"),
            folder,
        )
        return folder, manifest_path, verify(folder, manifest_path, owned=True)
    etags = {rel: o.etag for rel, o in wanted.items()}
    if recorded is not None and recorded.get("etags") == etags:
        return folder, manifest_path, verify(folder, manifest_path, owned=True)

    if recorded is not None:
        log.info("%s changed since %s was copied from it: copying what differs", resolved.id, folder)
    # Until the new manifest is written the folder is a sync in progress: a run after a kill here syncs again
    # rather than trust a mix of old and new files.
    manifest_path.unlink(missing_ok=True)
    needed = sum(o.size for rel, o in wanted.items() if not _same_size(folder / rel, o.size))
    check_free_space(folder, needed, resolved.id)
    try:
        download_prefix(s3_client(storage_cfg), resolved.id, folder, objects=list(wanted.values()), progress=True)
    except (BotoCoreError, ClientError) as err:
        raise _unreadable(resolved.id, err) from err
    except CorruptedDownloadError as err:  # the message says what to do; the type says a rerun may pass
        raise TransferFailedError(str(err)) from err
    except OSError as err:
        raise_if_disk_full(err, folder, "downloading (the next run resumes)")
        raise
    for rel in model_files(folder):
        if rel not in etags:  # gone upstream: a stale shard or index must not reach the conversion
            log.info("removing %s: no longer under %s", folder / rel, resolved.id)
            (folder / rel).unlink()
    return folder, manifest_path, write_manifest(folder, manifest_path, resolved, files=etags, extra={"etags": etags})


def _same_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _unreadable(uri: str, err: BaseException) -> TransferFailedError:
    return TransferFailedError(
        f"cannot read {uri} ({type(err).__name__}: {err}). Check storage.endpoint_url "
        "(or AWS_ENDPOINT_URL), the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
        "and the bucket name."
    )
