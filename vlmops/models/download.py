"""Fetch a model (ModelScope, HF hub, a local folder, S3), check it, and convert it to the native layout once.

`download_model` returns a `ModelSnapshot` whose `path` `from_pretrained` loads. The steps:

1. `catalog.resolve` picks the source, id and revision. A tiny catalog entry is built on the spot
   (`build_tiny_model`) when its local folder does not exist, then used like any local folder.
2. The first download writes a manifest (every file's size and sha256) under `<cache_dir>/manifests/`,
   beside the snapshots: never inside a hub's snapshot folder (its layout belongs to the hub's tools) nor
   in a user's folder. Later runs use the snapshot with no network, after checking it against the
   manifest: sizes always; sha256 for files under 1 MiB and for any file whose mtime changed since the
   manifest was written. Re-hashing 15 GB on every run would take minutes; a changed mtime is what every
   rewrite, truncation and re-download leaves behind. (A bit flip that keeps size and mtime is not caught:
   `refresh=True` re-downloads and re-hashes everything.) A local folder is the user's to change: if it
   no longer matches, its manifest is rebuilt rather than the run refused.
3. A snapshot in the original release layout is converted once into `<cache_dir>/converted/`, keyed by
   the source manifest's digest, and that folder is returned.

Only the files a model needs are fetched (`ALLOW_PATTERNS`); when a repository has safetensors weights its
`.bin` copies are skipped. Every failure says what to do: unknown id, hub unreachable, corrupted file,
disk full.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vlmops.config import ModelConfig, PipelineConfig, StorageConfig
from vlmops.errors import RunFailed
from vlmops.hashing import sha256_file
from vlmops.models.catalog import ResolvedModel, resolve
from vlmops.models.convert import convert_checkpoint, detect_layout
from vlmops.models.diskspace import check_free_space, gb, raise_if_disk_full

log = logging.getLogger(__name__)

ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.jinja",
    "*.model",
    "tokenizer*",
    "merges.txt",
    "vocab.txt",
]
SMALL_FILE_BYTES = 1024 * 1024  # always re-hashed when verifying: cheap, and configs are what people edit
MANIFEST_FORMAT = 1
_REFRESH_HINT = "rerun with refresh (`vlmops download --refresh`, or download_model(..., refresh=True))"


class ModelDownloadError(RunFailed):
    """A model could not be fetched; the message says why and what to do."""


class SnapshotCorruptedError(ModelDownloadError):
    """A downloaded snapshot no longer matches its manifest."""


@dataclass(frozen=True)
class ModelSnapshot:
    """A checkpoint on local disk, ready for `from_pretrained`, and where it came from."""

    path: Path
    """Native transformers checkpoint folder (the converted copy when the source was the release layout)."""
    manifest_path: Path
    """Manifest (file, size, sha256) of `path`."""
    digest: str
    """sha256 over the manifest entries of `path`: the content identity of this checkpoint."""
    source: str
    id: str
    revision: str | None
    converted: bool
    """Whether `path` is a conversion of the downloaded release layout."""
    original_path: Path
    """The downloaded (or local) folder as the source has it; equals `path` when no conversion was needed."""


def download_model(
    model_cfg: ModelConfig,
    storage_cfg: StorageConfig | None,
    output_dir: str | os.PathLike[str],
    *,
    refresh: bool = False,
) -> ModelSnapshot:
    """Fetch (or reuse), verify and if needed convert the model `model_cfg` names.

    Args:
        output_dir: the run's output folder; tiny catalog models are built under `<output_dir>/models/`.
        refresh: download again and re-hash everything, whatever is cached.

    Raises:
        ValueError: the model section names no known model or an impossible source/id.
        FileNotFoundError: a local folder that does not exist.
        ModelDownloadError: hub unreachable, unknown id or revision, corrupted snapshot.
        vlmops.models.diskspace.DiskFullError: not enough disk space (an OSError, errno ENOSPC), with how
            much is needed.
    """
    resolved = resolve(model_cfg, output_dir)
    cache = Path(model_cfg.cache_dir).expanduser()
    if resolved.source == "local":
        original, manifest_path = _local_snapshot(resolved, cache)
        manifest = _ensure_manifest(original, manifest_path, resolved, owned=False, refresh=refresh)
    elif resolved.source == "modelscope":
        original, manifest_path, manifest = _hub_snapshot(resolved, cache, refresh, _ModelScope())
    elif resolved.source == "huggingface":
        original, manifest_path, manifest = _hub_snapshot(resolved, cache, refresh, _HuggingFace())
    else:
        original, manifest_path, manifest = _s3_snapshot(resolved, storage_cfg, cache, refresh)

    digest = manifest_digest(manifest)
    if detect_layout(original) == "native":
        return ModelSnapshot(
            original, manifest_path, digest, resolved.source, resolved.id, resolved.revision, False, original
        )

    converted = cache / "converted" / f"{_safe_name(model_cfg.name)}-{digest[:16]}"
    converted_manifest = cache / "manifests" / "converted" / f"{converted.name}.json"
    if refresh and converted.exists():
        shutil.rmtree(converted)
    if not converted.exists():
        log.info("converting %s (release layout) into %s", original, converted)
        converted_manifest.unlink(missing_ok=True)
        try:
            convert_checkpoint(original, converted)
        except OSError:
            if not converted.is_dir():
                raise
            # Another process (a parallel flow run) renamed the same conversion into place first.
            log.info("%s was converted by another process meanwhile; using it", converted)
    native = _ensure_manifest(
        converted, converted_manifest, resolved, owned=True, refresh=refresh, extra={"source_digest": digest}
    )
    return ModelSnapshot(
        converted,
        converted_manifest,
        manifest_digest(native),
        resolved.source,
        resolved.id,
        resolved.revision,
        True,
        original,
    )


# --------------------------------------------------------------------------------------------------------
# local folders and tiny models


def local_source_path(config: PipelineConfig) -> str | None:
    """The local folder a `source: local` model is read from (a tiny catalog model is built there first).

    None for hub and S3 sources. The flow passes this to the download task so its cache key follows the
    folder's contents; building the tiny model before computing the key keeps the key stable across runs.
    """
    resolved = resolve(config.model, config.run.output_dir)
    if resolved.source != "local":
        return None
    return str(_local_folder(resolved))


def _local_folder(resolved: ResolvedModel) -> Path:
    from vlmops.models.tiny import build_tiny_model

    folder = Path(resolved.id).expanduser()
    entry = resolved.entry
    if not folder.exists() and entry is not None and entry.tiny_variant is not None:
        log.info("building %s at %s", entry.name, folder)
        build_tiny_model(folder, variant=entry.tiny_variant)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist (model.id with model.source: local)")
    return folder


def _local_snapshot(resolved: ResolvedModel, cache: Path) -> tuple[Path, Path]:
    folder = _local_folder(resolved)
    key = hashlib.sha1(str(folder.resolve()).encode(), usedforsecurity=False).hexdigest()[:12]
    return folder, cache / "manifests" / "local" / f"{_safe_name(folder.name)}-{key}.json"


# --------------------------------------------------------------------------------------------------------
# hubs


class _Hub(Protocol):
    """What differs between ModelScope and the HF hub: listing, downloading, the cached path, errors."""

    name: str
    subdir: str

    def list_files(self, repo_id: str, revision: str | None) -> dict[str, int]:
        """{path: size} of every file at this revision."""

    def download(self, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path:
        """Fetch the files matching `patterns` (resuming partial ones); the snapshot folder."""

    def cached(self, repo_id: str, revision: str | None, cache: Path, patterns: list[str]) -> Path | None:
        """The snapshot of `patterns` already in `cache`, found with no network; None if there is none."""

    def explain(self, err: BaseException, repo_id: str, revision: str | None) -> ModelDownloadError | None:
        """The error to show for a failure of this hub's client, None when it is not one we know."""


class _ModelScope:
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

    def explain(self, err: BaseException, repo_id: str, revision: str | None) -> ModelDownloadError | None:
        import requests
        from modelscope_hub.errors import NotExistError

        text = str(err)
        if isinstance(err, NotExistError) or (isinstance(err, requests.HTTPError) and "404" in text) or "E1004" in text:
            return _unknown_id(self.name, repo_id, revision)
        if isinstance(err, ConnectionError | requests.ConnectionError | requests.Timeout):
            return _unreachable(self.name, "MODELSCOPE_ENDPOINT", err)
        return None


class _HuggingFace:
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


def _hub_snapshot(resolved: ResolvedModel, cache: Path, refresh: bool, hub: _Hub) -> tuple[Path, Path, dict[str, Any]]:
    hub_cache = cache / hub.subdir
    manifest_path = (
        cache
        / "manifests"
        / hub.subdir
        / _safe_name(resolved.id)
        / f"{_safe_name(resolved.revision or 'default')}.json"
    )
    recorded = _read_json_or_none(manifest_path)
    patterns = list(recorded.get("allow_patterns", ALLOW_PATTERNS)) if recorded else list(ALLOW_PATTERNS)
    snapshot = hub.cached(resolved.id, resolved.revision, hub_cache, patterns)
    if snapshot is not None and refresh:
        _remove_snapshot(snapshot)
        manifest_path.unlink(missing_ok=True)
        snapshot = None
    if snapshot is not None and manifest_path.is_file():
        return snapshot, manifest_path, _verify(snapshot, manifest_path, owned=True)

    # Not cached, or an interrupted download (no manifest yet): fetch; the hub clients resume partial files.
    try:
        listing = hub.list_files(resolved.id, resolved.revision)
        patterns = _patterns_for(listing)
        wanted = {p: s for p, s in listing.items() if _matches(p, patterns)}
        if not wanted:
            raise ModelDownloadError(
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
        raise ModelDownloadError(
            f"{hub.name} download of {resolved.id} is missing {', '.join(missing)}; {_REFRESH_HINT}"
        )
    manifest = _write_manifest(
        snapshot, manifest_path, resolved, files=sorted(wanted), extra={"allow_patterns": patterns}
    )
    return snapshot, manifest_path, manifest


def _remove_snapshot(snapshot: Path) -> None:
    """Delete a hub snapshot and the files it links to (the HF cache keeps contents in blobs/ behind
    symlinks, and would relink a damaged blob instead of fetching it again)."""
    log.info("refresh: removing %s", snapshot)
    for path in snapshot.rglob("*"):
        if path.is_symlink():
            path.resolve().unlink(missing_ok=True)
    shutil.rmtree(snapshot)


def _read_json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _patterns_for(listing: Iterable[str]) -> list[str]:
    """ALLOW_PATTERNS, less `*.bin` when the repository has safetensors weights (no second copy)."""
    names = list(listing)
    if any(n.endswith(".safetensors") for n in names):
        return [p for p in ALLOW_PATTERNS if p != "*.bin"]
    return list(ALLOW_PATTERNS)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def _unknown_id(hub: str, repo_id: str, revision: str | None) -> ModelDownloadError:
    return ModelDownloadError(
        f"{hub} has no model {repo_id!r} at revision {revision!r}: check model.id and model.revision "
        "(`vlmops models` lists the catalog's ids)"
    )


def _unreachable(hub: str, env: str, err: BaseException) -> ModelDownloadError:
    return ModelDownloadError(
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


def _s3_snapshot(
    resolved: ResolvedModel, storage_cfg: StorageConfig | None, cache: Path, refresh: bool
) -> tuple[Path, Path, dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError

    from vlmops.storage import download_prefix, list_objects, parse_s3_uri, s3_client

    bucket, prefix = parse_s3_uri(resolved.id)
    folder = cache / "s3" / bucket / prefix
    manifest_path = cache / "manifests" / "s3" / bucket / f"{_safe_name(prefix or 'root')}.json"
    if folder.is_dir() and manifest_path.is_file() and not refresh:
        return folder, manifest_path, _verify(folder, manifest_path, owned=True)
    client = s3_client(storage_cfg)
    try:
        objects = list_objects(client, bucket, prefix)
        if not objects:
            raise ModelDownloadError(f"no objects under {resolved.id}: check model.id (and storage.endpoint_url)")
        sizes = {(o.key[len(prefix) + 1 :] if prefix else o.key): o.size for o in objects}
        patterns = _patterns_for(sizes)
        wanted = sorted(rel for rel in sizes if _matches(rel, patterns))
        if not wanted:
            raise ModelDownloadError(f"no model files under {resolved.id} (nothing matches {', '.join(patterns)})")
        check_free_space(folder, sum(sizes[rel] for rel in wanted), resolved.id)
        download_prefix(client, resolved.id, folder, patterns=patterns, progress=True)
        for rel in _model_files(folder):
            if rel not in wanted:  # gone upstream: a stale shard or index must not reach the conversion
                log.info("removing %s: no longer under %s", folder / rel, resolved.id)
                (folder / rel).unlink()
    except ModelDownloadError:
        raise
    except (BotoCoreError, ClientError) as err:
        raise ModelDownloadError(
            f"cannot read {resolved.id} ({type(err).__name__}: {err}). Check storage.endpoint_url "
            "(or AWS_ENDPOINT_URL), the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
            "and the bucket name."
        ) from err
    except OSError as err:
        raise_if_disk_full(err, folder, "downloading (the next run resumes)")
        raise
    return folder, manifest_path, _write_manifest(folder, manifest_path, resolved, files=wanted)


# --------------------------------------------------------------------------------------------------------
# manifests


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 over (path, size, sha256) of every file: identical for identical contents."""
    lines = "".join(f"{p}\t{f['size']}\t{f['sha256']}\n" for p, f in sorted(manifest["files"].items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def build_manifest(folder: Path, files: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256, mtime_ns}} for `files`, or every model file in `folder`."""
    names = sorted(files) if files is not None else _model_files(folder)
    out = {}
    for name in names:
        path = folder / name
        stat = path.stat()
        out[name] = {"size": stat.st_size, "sha256": sha256_file(path), "mtime_ns": stat.st_mtime_ns}
    return out


def _model_files(folder: Path) -> list[str]:
    """Files under `folder` that a model needs (ALLOW_PATTERNS), skipping hidden files and folders."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not path.is_file():
            continue
        if _matches(rel, ALLOW_PATTERNS):
            out.append(rel)
    return sorted(out)


def _write_manifest(
    folder: Path,
    manifest_path: Path,
    resolved: ResolvedModel,
    files: Iterable[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": resolved.source,
        "id": resolved.id,
        "revision": resolved.revision,
        "folder": str(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
        "files": build_manifest(folder, files),
    }
    _write_json_atomic(manifest_path, manifest)
    log.info("wrote manifest %s (%d files)", manifest_path, len(manifest["files"]))
    return manifest


def _ensure_manifest(
    folder: Path,
    manifest_path: Path,
    resolved: ResolvedModel,
    *,
    owned: bool,
    refresh: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Verify `folder` against its manifest, or write one. `owned`: a mismatch is corruption, not a change."""
    if manifest_path.is_file() and not refresh:
        try:
            return _verify(folder, manifest_path, owned=owned)
        except SnapshotCorruptedError as err:
            if owned:
                raise
            log.warning(
                "%s changed since its manifest was written (%s); re-hashing it",
                folder,
                err.args[0].split(":")[0],
            )
    return _write_manifest(folder, manifest_path, resolved, extra=extra)


def _verify(folder: Path, manifest_path: Path, *, owned: bool) -> dict[str, Any]:
    """Check `folder` against its manifest with no network (the policy is in the module docstring)."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SnapshotCorruptedError(
            f"{manifest_path}: damaged manifest. Delete it and {folder}, or {_REFRESH_HINT}"
        ) from None
    fix = f"Delete {folder} or {_REFRESH_HINT} to download it again." if owned else "It was re-hashed."
    touched = False
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            raise SnapshotCorruptedError(f"{path}: missing from the snapshot (listed in {manifest_path}). {fix}")
        stat = path.stat()
        if stat.st_size != record["size"]:
            raise SnapshotCorruptedError(
                f"{path}: corrupted, {stat.st_size} bytes where the manifest says {record['size']}. {fix}"
            )
        if stat.st_size < SMALL_FILE_BYTES or stat.st_mtime_ns != record.get("mtime_ns"):
            if sha256_file(path) != record["sha256"]:
                raise SnapshotCorruptedError(f"{path}: corrupted, its sha256 differs from {manifest_path}. {fix}")
            if stat.st_mtime_ns != record.get("mtime_ns"):
                record["mtime_ns"] = stat.st_mtime_ns  # same content, touched: trust the new mtime from now on
                touched = True
    if touched:
        _write_json_atomic(manifest_path, manifest)
    log.info("verified %s against %s (%d files)", folder, manifest_path, len(files))
    return dict(manifest)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "--" if c == "/" else "_" for c in text).strip(".") or "_"


# --------------------------------------------------------------------------------------------------------
# the command


def download_command(config_path: str | None, overrides: list[str] | None = None, refresh: bool = False) -> int:
    """`vlmops download`: fetch the config's model, print where it is. Returns the exit code."""
    from vlmops.config import ConfigError, load_config

    try:
        config = load_config(config_path, overrides)
        snapshot = download_model(config.model, config.storage, config.run.output_dir, refresh=refresh)
    except (ConfigError, ValueError, FileNotFoundError, ModelDownloadError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"model {config.model.name}: {snapshot.source} {snapshot.id}"
        + (f"@{snapshot.revision}" if snapshot.revision else "")
    )
    if snapshot.converted:
        print(f"  release layout:  {snapshot.original_path}")
        print(f"  converted:       {snapshot.path}")
    else:
        print(f"  checkpoint:      {snapshot.path}")
    print(f"  manifest:        {snapshot.manifest_path} (sha256 {snapshot.digest[:16]}...)")
    return 0
