"""Fetch a model (ModelScope, HF hub, a local folder, S3), check it, and convert it to the native layout once.

`download_model` returns a `ModelSnapshot` whose `path` `from_pretrained` loads. The steps:

1. `catalog.resolve` picks the source, id and revision. A tiny catalog entry is built on the spot
   (`build_tiny_model`) when its local folder does not exist, then used like any local folder.
2. The first download writes a manifest (every file's size and sha256) under `<cache_dir>/manifests/`,
   beside the snapshots (a tiny model built under `run.output_dir`: under `<output_dir>/models/manifests/`,
   beside the model): never inside a hub's snapshot folder (its layout belongs to the hub's tools) nor
   in a user's folder. Later runs use the snapshot with no network, after checking it against the
   manifest: sizes always; sha256 for files under 1 MiB and for any file whose mtime changed since the
   manifest was written. Re-hashing 15 GB on every run would take minutes; a changed mtime is what every
   rewrite, truncation and re-download leaves behind. (A bit flip that keeps size and mtime is not caught:
   `refresh=True` re-downloads and re-hashes everything.) A local folder is the user's to change: if it
   no longer matches, or holds a model file its manifest does not list, its manifest is rebuilt rather than
   the run refused. An S3 copy is reused while the
   prefix's listing (keys and ETags, one request) is the one it was made from; what changed there is copied
   again, and with S3 out of reach the verified copy is used with a warning. Two processes that fetch one hub or S3
   model into one cache take turns (a lock beside its manifest): the second waits, then uses what the first verified.
3. A snapshot in the original release layout is converted once into `<cache_dir>/converted/`, keyed by
   the source manifest's digest, and that folder is returned.

Only the files a model needs are fetched (`manifest.ALLOW_PATTERNS`); when a repository has safetensors
weights its `.bin` copies are skipped. Every failure says what to do: unknown id, hub unreachable, corrupted
file, disk full. The fetchers are in `hubs`, the manifests in `manifest`, the errors in `download_errors`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlmops.config import ModelConfig, PipelineConfig, StorageConfig
from vlmops.filenames import safe_name
from vlmops.models.catalog import ResolvedModel, built_models_dir, resolve
from vlmops.models.convert import convert_checkpoint, detect_layout
from vlmops.models.download_errors import (
    ModelDownloadError,
    ModelFolderNotFoundError,
    ModelNotFoundError,
    SnapshotCorruptedError,
    TransferFailedError,
)
from vlmops.models.hubs import (
    HuggingFace,
    ModelScope,
    hub_snapshot,
    local_folder,
    local_snapshot,
    s3_model_files,
    s3_snapshot,
)
from vlmops.models.manifest import ensure_manifest, manifest_digest, model_files, read_json_or_none

# The errors callers catch come from here, with the function that raises them.
__all__ = [
    "ModelDownloadError",
    "ModelFolderNotFoundError",
    "ModelNotFoundError",
    "ModelSnapshot",
    "SnapshotCorruptedError",
    "TransferFailedError",
    "download_model",
    "local_source_path",
    "s3_source_etags",
]

log = logging.getLogger(__name__)


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
    source_manifest_path: Path | None = None
    """Manifest of `original_path` (`manifest_path` when no conversion was needed); None in a snapshot cached by a
    Prefect run before it was recorded."""

    def is_current(self) -> bool:
        """Whether the model cache still holds what this snapshot says: its folder, and manifests with the digests it
        was made from. A snapshot kept by another process (a flow's cached download step) goes out of date when
        `vlmops download --refresh` fetches the model again: a hub revision or S3 prefix that changed meanwhile gets a
        new manifest in place, and a release layout a new conversion beside the old one, which is still there."""
        manifest = read_json_or_none(self.manifest_path)
        if not self.path.is_dir() or manifest is None or manifest_digest(manifest) != self.digest:
            return False
        if not self.converted:
            return True
        source = read_json_or_none(self.source_manifest_path) if self.source_manifest_path else None
        return source is not None and manifest.get("source_digest") == manifest_digest(source)


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
        UserInputError: the model section names no known model or an impossible source/id, or a model file of a
            local folder is a broken link (exit 2).
        ModelFolderNotFoundError: a local folder that does not exist (exit 2).
        ModelNotFoundError: the source has no such id or revision, or no model files under it (exit 2).
        TransferFailedError: hub or bucket unreachable, a download that broke off or arrived damaged (exit 1).
        SnapshotCorruptedError: a cached snapshot no longer matches its manifest (exit 1).
        vlmops.staging.LockTimeoutError: another process has been fetching the model into the same cache for
            longer than BUILD_LOCK_TIMEOUT_S (exit 1).
        vlmops.models.diskspace.DiskFullError: not enough disk space (an OSError, errno ENOSPC), with how
            much is needed (exit 1).
        vlmops.models.convert.ConversionError: a release-layout folder the converter refuses (exit 2).
    """
    resolved = resolve(model_cfg, output_dir)
    cache = Path(model_cfg.cache_dir).expanduser()
    if resolved.source == "local":
        original, manifest_path = local_snapshot(resolved, _manifest_root(resolved, cache, output_dir))
        added = _added_files(original, manifest_path)
        if added:
            log.info("%s has model files its manifest does not list (%s); re-hashing it", original, ", ".join(added))
        manifest = ensure_manifest(original, manifest_path, resolved, owned=False, refresh=refresh or bool(added))
    elif resolved.source == "modelscope":
        original, manifest_path, manifest = hub_snapshot(resolved, cache, refresh, ModelScope())
    elif resolved.source == "huggingface":
        original, manifest_path, manifest = hub_snapshot(resolved, cache, refresh, HuggingFace())
    else:
        original, manifest_path, manifest = s3_snapshot(resolved, storage_cfg, cache, refresh)

    digest = manifest_digest(manifest)
    if detect_layout(original) == "native":
        return ModelSnapshot(
            original,
            manifest_path,
            digest,
            resolved.source,
            resolved.id,
            resolved.revision,
            False,
            original,
            manifest_path,
        )

    converted = cache / "converted" / f"{safe_name(model_cfg.name)}-{digest[:16]}"
    converted_manifest = cache / "manifests" / "converted" / f"{converted.name}.json"
    if refresh and converted.exists():
        shutil.rmtree(converted)
    if not converted.exists():
        log.info("converting %s (release layout) into %s", original, converted)
        converted_manifest.unlink(missing_ok=True)
        try:
            convert_checkpoint(original, converted, allow_pickle=model_cfg.allow_pickle)
        except OSError:
            if not converted.is_dir():
                raise
            # Another process (a parallel flow run) renamed the same conversion into place first.
            log.info("%s was converted by another process meanwhile; using it", converted)
    native = ensure_manifest(
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
        manifest_path,
    )


def _manifest_root(resolved: ResolvedModel, cache: Path, output_dir: str | os.PathLike[str]) -> Path:
    """Where a local folder's manifest goes: beside a tiny model built under `run.output_dir`, which is the run's own
    output (its manifest in the model cache, ~/.cache by default, was a file left behind per output folder, even by
    `vlmops validate`); the model cache for any other folder."""
    built = built_models_dir(output_dir)
    tiny = resolved.entry is not None and resolved.entry.tiny_variant is not None
    return built if tiny and Path(resolved.id).parent == built else cache


def _added_files(folder: Path, manifest_path: Path) -> list[str]:
    """Model files in a user's folder that its manifest does not list: put there since, and part of its content (a
    tokenizer file the converter reads), which checking the listed files alone would miss."""
    recorded = read_json_or_none(manifest_path)
    if recorded is None or not isinstance(recorded.get("files"), dict):
        return []
    return sorted(set(model_files(folder)) - set(recorded["files"]))


def local_source_path(config: PipelineConfig) -> str | None:
    """The local folder a `source: local` model is read from (a tiny catalog model is built there first).

    None for hub and S3 sources. The flow passes this to the download task so its cache key follows the
    folder's contents; building the tiny model before computing the key keeps the key stable across runs.
    """
    resolved = resolve(config.model, config.run.output_dir)
    if resolved.source != "local":
        return None
    return str(local_folder(resolved))


def s3_source_etags(
    model_cfg: ModelConfig, storage_cfg: StorageConfig | None, output_dir: str | os.PathLike[str]
) -> dict[str, str] | None:
    """{relative path: ETag} of an S3 model's files as the prefix lists them now; None for other sources, or when
    the bucket cannot be listed (the download then uses its cached copy, with a warning).

    The download task's cache key includes it: a prefix rewritten in place is downloaded again, not served from the
    run before.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    resolved = resolve(model_cfg, output_dir)
    if resolved.source != "s3":
        return None
    try:
        wanted = s3_model_files(resolved.id, storage_cfg)
    except (BotoCoreError, ClientError, ModelNotFoundError):
        return None  # the download itself says what is wrong
    return {rel: o.etag for rel, o in wanted.items()}
