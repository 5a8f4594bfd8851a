"""S3 helpers: a client from the config, `s3://` URIs, folder <-> prefix copies that skip what is there.

Works with AWS and any S3-compatible server (SeaweedFS, MinIO): `storage.endpoint_url` in pipeline.yaml, else
the `AWS_ENDPOINT_URL` environment variable, else AWS. Credentials come from boto3's usual chain
(`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `~/.aws`, instance roles).

"Already there" means the same size and the same content, as far as the object's HEAD lets a file be checked
(`vlmops.s3_content`): against its ETag where that is an MD5 (not for SSE-KMS or SSE-C objects), else against the
checksum S3 keeps with it. A multipart value does not say the part size: the likeliest sizes are tried, then the size
the server reports for the object's first part. Every download is checked the same way before it is renamed into
place. An object with neither is never taken to be a local file of its size: it is downloaded again, and only the
download's size is checked, with a warning that says why.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

from vlmops.config import StorageConfig
from vlmops.errors import RunFailed, UserInputError
from vlmops.folders import listed_under, refuse_unreadable
from vlmops.s3_content import ETAG, MIB, ContentCheck, content_check, guessed_part_sizes

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

REQUESTS_AT_ONCE = 16
"""Requests one step sends at once through a client (the cache key's HEADs: `vlmops.fingerprints.HEAD_THREADS`), and
the connections the client keeps open for them (botocore keeps 10, and opens and drops the rest with a warning each)."""

STALE_PARTIAL_S = 15 * 60
"""A partial download untouched this long is a dead process's: one in progress writes every few seconds (boto3
gives up on a read after 60 s). Younger ones may be another run's copy into the same folder, and are left alone."""


class CorruptedDownloadError(RunFailed):
    """A downloaded object's bytes differ from what S3 says it holds: the copy broke on the way (exit 1, and a
    Prefect task retries it), or it cannot be checked the way it was uploaded (the message says which)."""


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str  # without the quotes S3 wraps it in
    modified: float = 0.0  # seconds since the epoch (S3's LastModified)


@dataclass
class TransferReport:
    """What a folder copy did."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_copied: int = 0


def s3_client(storage: StorageConfig | None = None) -> S3Client:
    """The boto3 S3 client for `storage` (endpoint and region), else the environment's settings.

    One client per setting, made once: a client costs milliseconds and a connection pool, and a dataset
    reads thousands of images through it (boto3 clients are safe to share between threads).
    """
    storage = storage or StorageConfig()
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # The credentials the environment names are part of the key: a changed key pair gets a new client.
    credentials = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"))
    return _client(endpoint, storage.region, credentials)


@functools.lru_cache(maxsize=16)
def _client(endpoint: str | None, region: str | None, credentials: tuple[str | None, ...]) -> S3Client:
    import boto3
    from botocore.config import Config

    # Path-style addressing: S3-compatible servers on a host:port have no per-bucket DNS names.
    config = Config(
        s3={"addressing_style": "path" if endpoint else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        max_pool_connections=REQUESTS_AT_ONCE,
    )
    # A session of its own: boto3's default session resolves credentials once and keeps them, so a client
    # made for a changed key pair (or for none) would still sign with the first pair it found.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); the prefix may be empty.

    Raises:
        ValueError: not an s3://bucket[/prefix] URI.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an S3 URI: write it as s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket name: write it as s3://bucket/prefix")
    return bucket, prefix.strip("/")


def list_objects(client: S3Client, bucket: str, prefix: str) -> list[S3Object]:
    """Every object under `prefix/` (the prefix is a folder: `a/b` does not match `a/bc`)."""
    folder = f"{prefix}/" if prefix else ""
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        objects += [_listed(item) for item in page.get("Contents", []) if not item["Key"].endswith("/")]
    return objects  # (a key ending in "/" is a folder marker some tools create)


def _listed(item: Any) -> S3Object:
    etag, modified = item["ETag"].strip('"'), item["LastModified"].timestamp()
    return S3Object(key=item["Key"], size=int(item["Size"]), etag=etag, modified=modified)


@dataclass(frozen=True)
class Listing:
    """The objects an `s3://bucket/prefix` URI names: those under the prefix, sorted by key, or the one object whose key
    it is (`single`). `folder` is what their names are relative to: the prefix with its slash, or the object's own
    prefix (`""` at the bucket's root)."""

    bucket: str
    folder: str
    objects: list[S3Object]
    single: bool = False

    def uri(self, obj: S3Object) -> str:
        return f"s3://{self.bucket}/{obj.key}"

    def name(self, obj: S3Object) -> str:
        return obj.key[len(self.folder) :]


def list_uri(uri: str, storage: StorageConfig | None = None) -> Listing:
    """What `uri` names: the objects under it as a prefix (a folder: `s3://b/a` does not take `a.jsonl` or `ab/x`),
    else the object it names; no objects for neither. One LIST per 1,000 objects, plus one for a single object.

    Raises:
        ValueError: not an s3://bucket[/prefix] URI.
        FileNotFoundError: the bucket does not exist (on the server `storage.endpoint_url` names).
        UserInputError: no credentials, or the server refuses them.
    """
    from botocore.exceptions import ClientError, NoCredentialsError

    bucket, prefix = parse_s3_uri(uri)
    client = s3_client(storage)
    try:
        objects = sorted(list_objects(client, bucket, prefix), key=lambda o: o.key)
        if objects or not prefix:
            return Listing(bucket, f"{prefix}/" if prefix else "", objects)
        # The key itself sorts first among the keys it begins: one object listed answers whether it is there.
        first = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("Contents", [])
    except NoCredentialsError as err:
        raise UserInputError(
            f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from err
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        where = f"on the S3 server at {client.meta.endpoint_url}"
        if code == "NoSuchBucket":
            raise FileNotFoundError(
                f"{uri}: there is no bucket {bucket!r} {where}; check the URI, and storage.endpoint_url (or "
                "AWS_ENDPOINT_URL) for the server"
            ) from err
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise UserInputError(
                f"{uri}: access denied ({code}) {where}; check the S3 credentials (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            ) from err
        raise
    named = [_listed(item) for item in first if item["Key"] == prefix]
    return Listing(bucket, prefix.rpartition("/")[0] + "/" if "/" in prefix else "", named, single=bool(named))


@contextmanager
def open_object(uri: str, storage: StorageConfig | None = None, offset: int = 0) -> Iterator[IO[bytes]]:
    """A binary stream of the object at `s3://bucket/key` from `offset` on (a ranged GET), read as it arrives: never
    held whole.

    Raises:
        FileNotFoundError: no such object (deleted since it was listed).
    """
    from botocore.exceptions import ClientError

    bucket, key = parse_s3_uri(uri)
    extra = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        body = s3_client(storage).get_object(Bucket=bucket, Key=key, **extra)["Body"]  # type: ignore[arg-type]
    except ClientError as err:
        if str(err.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(f"{uri}: no such object (deleted since it was listed?)") from err
        raise
    try:
        yield body  # type: ignore[misc]
    finally:
        body.close()


def stat_object(uri: str, storage: StorageConfig | None = None) -> S3Object | None:
    """The object at `s3://bucket/key` as its HEAD describes it (one request, nothing downloaded); None where there is
    none (no such key or bucket; a URI of a bucket alone names no object).

    Raises:
        ValueError: not an s3://bucket/key URI.
        botocore.exceptions.ClientError: S3 refused the request (credentials) or failed (a 5xx, throttling).
        botocore.exceptions.BotoCoreError: no credentials; the server did not answer.
    """
    from botocore.exceptions import ClientError

    bucket, key = parse_s3_uri(uri)
    if not key:
        return None
    try:
        head = s3_client(storage).head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        # A HEAD's answer has no body: a missing key or bucket is a bare 404.
        if str(err.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            return None
        raise
    etag, modified = head["ETag"].strip('"'), head["LastModified"].timestamp()
    return S3Object(key=key, size=int(head["ContentLength"]), etag=etag, modified=modified)


def object_check(client: S3Client, bucket: str, key: str) -> ContentCheck:
    """How a local copy of the object is checked (`content_check` of its HEAD: one request)."""
    return content_check(client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))


def same_as_object(client: S3Client, bucket: str, obj: S3Object, path: Path, check: ContentCheck | None = None) -> bool:
    """Whether `path` holds `obj`'s bytes: its size, and its ETag or checksum as `check` (default: `object_check`)
    says. A multipart value is tried with the guessed part sizes, then with the size the server reports for the
    object's first part (one more HEAD). False where only the size can be compared: a file of the same size may be
    another version of the object (a retrained checkpoint has the same size as the last one)."""
    if not _same_size(path, obj.size):
        return False
    check = check or object_check(client, bucket, obj.key)
    if check.matches(path, obj.size):
        return True
    count = check.parts
    if count is None:
        return False
    part_size = _server_part_size(client, bucket, obj.key, count)
    if part_size is None or part_size in guessed_part_sizes(obj.size, count):
        return False
    return check.matches(path, obj.size, part_size)


def read_object(uri: str, storage: StorageConfig | None = None) -> bytes:
    """The bytes of one s3://bucket/key object (an image, a small file)."""
    bucket, key = parse_s3_uri(uri)
    response = s3_client(storage).get_object(Bucket=bucket, Key=key)
    return bytes(response["Body"].read())


def download_prefix(
    client: S3Client,
    uri: str,
    dest: str | os.PathLike[str],
    *,
    patterns: list[str] | None = None,
    objects: list[S3Object] | None = None,
    progress: bool = True,
) -> TransferReport:
    """Copy the objects under `uri` into `dest` (keys relative to the prefix), skipping identical files.

    `patterns`: only keys whose relative path matches one of these globs (fnmatch); None copies all.
    `objects`: the objects under `uri` as the caller just listed them (`list_objects`), to save listing again.

    Each object is written to a hidden temporary file, checked against its ETag or checksum (`same_as_object`) and
    renamed into place, so an interrupted or corrupted copy never leaves a file under its real name. An object that
    can be checked by its size alone is logged with a warning that says why.

    Raises:
        FileNotFoundError: nothing under `uri`.
        ValueError: an object's key names no file inside `dest`.
        CorruptedDownloadError: a downloaded object does not match its ETag or checksum (its partial file is
            removed).
    """
    from botocore.exceptions import FlexibleChecksumError

    bucket, prefix = parse_s3_uri(uri)
    if objects is None:
        objects = list_objects(client, bucket, prefix)
    if not objects:
        raise FileNotFoundError(f"no objects under {uri}: check the bucket and prefix (and storage.endpoint_url)")
    root = Path(dest)
    _remove_stale_partials(root)
    report = TransferReport()
    todo: list[tuple[S3Object, Path, ContentCheck | None]] = []
    for obj in objects:
        rel = obj.key[len(prefix) + 1 :] if prefix else obj.key
        if patterns is not None and not any(fnmatch.fnmatch(rel, p) for p in patterns):
            continue
        target = _local_path(root, rel, f"s3://{bucket}/{obj.key}")
        # One HEAD per object at most, kept for the check after its download; none for a file that is not there.
        check = object_check(client, bucket, obj.key) if _same_size(target, obj.size) else None
        if check is not None and same_as_object(client, bucket, obj, target, check):
            report.skipped.append(rel)
        else:
            todo.append((obj, target, check))
    with _bar(sum(o.size for o, _, _ in todo), f"download {uri}", progress) as bar:
        for obj, target, check in todo:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = partial_path(target)
            try:
                client.download_file(bucket, obj.key, str(partial), Callback=bar.update)
            except FlexibleChecksumError as err:  # botocore's own check of a download made in one request
                partial.unlink(missing_ok=True)
                raise CorruptedDownloadError(f"s3://{bucket}/{obj.key} arrived corrupted ({err}); run again") from err
            _check_download(client, bucket, obj, partial, check or object_check(client, bucket, obj.key))
            partial.replace(target)
            report.copied.append(str(target.relative_to(root)))
            report.bytes_copied += obj.size
    log.info("%s -> %s: %d copied, %d already there", uri, root, len(report.copied), len(report.skipped))
    return report


def upload_folder(client: S3Client, src: str | os.PathLike[str], uri: str, *, progress: bool = True) -> TransferReport:
    """Copy every file under `src` to `uri/<relative path>`, skipping objects that are already identical.

    Raises:
        UserInputError: a file under `src` is a broken link or no file (a named pipe), before anything is copied.
    """
    bucket, prefix = parse_s3_uri(uri)
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    listed = listed_under(root)
    partials = [p for p in listed if is_partial(p)]
    if partials:
        log.info("%s: leaving out %d partial downloads (%s)", root, len(partials), ", ".join(p.name for p in partials))
    files = [p for p in listed if not is_partial(p)]
    refuse_unreadable(files)
    remote = {o.key: o for o in list_objects(client, bucket, prefix)}
    report = TransferReport()
    todo: list[tuple[Path, str]] = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        key = f"{prefix}/{rel}" if prefix else rel
        existing = remote.get(key)
        if existing is not None and same_as_object(client, bucket, existing, path):
            report.skipped.append(rel)
        else:
            todo.append((path, key))
    with _bar(sum(p.stat().st_size for p, _ in todo), f"upload {uri}", progress) as bar:
        for path, key in todo:
            client.upload_file(str(path), bucket, key, Callback=bar.update)
            report.copied.append(path.relative_to(root).as_posix())
            report.bytes_copied += path.stat().st_size
    log.info("%s -> %s: %d copied, %d already there", root, uri, len(report.copied), len(report.skipped))
    return report


def partial_path(target: Path) -> Path:
    """Where `download_prefix` writes `target` before renaming it into place: hidden, beside it."""
    return target.with_name(f".{target.name}.part")


def is_partial(path: Path) -> bool:
    """Whether `path` is a download in progress or left by a killed one: `partial_path`'s, or the temporary file
    boto3 writes it through (`.NAME.part.XXXXXXXX`). Not model or data files: never listed, hashed or uploaded."""
    name = path.name
    return name.startswith(".") and (name.endswith(".part") or ".part." in name)


def _remove_stale_partials(root: Path) -> None:
    """Delete the partial downloads a killed run left under `root` (not those being written now)."""
    if not root.is_dir():
        return
    now = time.time()
    for path in root.rglob(".*"):
        if path.is_file() and is_partial(path) and now - path.stat().st_mtime > STALE_PARTIAL_S:
            log.info("removing %s: a partial download left by a run that stopped", path)
            path.unlink(missing_ok=True)


def _local_path(root: Path, rel: str, uri: str) -> Path:
    """`root / rel` for an object's key below the prefix, refused when the key would not name a file inside `root`.

    S3 keys are plain strings: AWS keeps `a/../b`, `a/./b` and `a//b` as written, and pathlib would take `..` up a
    folder and an empty part (`prefix//etc/x` -> `/etc/x`) for the filesystem's root.
    """
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"{uri}: its key has an empty, '.' or '..' part, so it names no file inside {root}; rename the object "
            "(a key without '//', '/./' or '/../') or leave it out of the prefix"
        )
    return root.joinpath(*parts)


def _check_download(client: S3Client, bucket: str, obj: S3Object, partial: Path, check: ContentCheck) -> None:
    """Return if `partial` holds `obj` as far as `check` can tell; else remove it and raise CorruptedDownloadError."""
    uri = f"s3://{bucket}/{obj.key}"
    if check.algorithm is None and _same_size(partial, obj.size):
        log.warning("%s: only its size could be checked, not its content: %s", uri, check.why_size_only)
        return
    if check.algorithm is not None and same_as_object(client, bucket, obj, partial, check):
        return
    size = partial.stat().st_size if partial.is_file() else 0
    partial.unlink(missing_ok=True)
    raise CorruptedDownloadError(_corrupted(uri, obj, check, size))


def _corrupted(uri: str, obj: S3Object, check: ContentCheck, size: int) -> str:
    if size != obj.size:
        return f"{uri} arrived corrupted ({size} bytes of {obj.size}); run again"
    value = "ETag" if check.algorithm == ETAG else f"{check.algorithm} checksum"
    count = check.parts
    if count is None:
        differs = "MD5 differs from its ETag" if check.algorithm == ETAG else f"{value} differs from the one S3 keeps"
        return f"{uri} arrived corrupted ({differs}); run again"
    return (
        f"{uri} arrived corrupted, or was uploaded in parts of unequal sizes: no part size gives its multipart {value} "
        f"{check.expected} (tried {', '.join(f'{s / MIB:g} MiB' for s in guessed_part_sizes(obj.size, count))} and the "
        "size the server reports for its first part); run again, and if it fails the same way, upload the object "
        "again in parts of one size (`aws s3 cp`, boto3's `upload_file`)"
    )


def _server_part_size(client: S3Client, bucket: str, key: str, count: int) -> int | None:
    """The size of the object's first part, as the server reports it (HeadObject with PartNumber=1); None when it
    does not tell. AWS, SeaweedFS, MinIO and Ceph do; a server that ignores PartNumber describes the whole object,
    without the count of parts."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key, PartNumber=1)
    except ClientError as err:
        log.info("s3://%s/%s: the server does not tell its part size (%s)", bucket, key, err)
        return None
    return int(head["ContentLength"]) if head.get("PartsCount") == count else None


def _same_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _bar(total: int, label: str, enabled: bool) -> tqdm:
    """A byte progress bar whose `update` boto3 calls per chunk; hidden when off or nothing to copy."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not enabled or total == 0)
