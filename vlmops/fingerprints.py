"""Fingerprints of the files a step reads: the words a cache key gives them, which change when those files change.

A step's cache key (tasks.caching, Prefect's INPUTS + TASK_SOURCE) hashes its arguments; a path argument alone would
reuse a stale result after the file behind it changed. `fingerprint` gives the words for the files behind one
argument: a file's sha256; for a dataset file, also each image its records name, found as validation finds them
(`iter_dataset`, which resolves relative paths against the file's folder, follows symlinks and keeps to that folder
and `data.allowed_roots`); for a dataset folder, each dataset file validation reads from it (`dataset_files`: a part
added, removed or renamed is a change, a README beside the parts is not), by its relative path and as a dataset file;
for an `s3://` dataset object or prefix, the same: each dataset object validation reads (`list_uri`,
`dataset_objects`: one LIST request per 1,000 objects) by its URI, its size and ETag (which S3 changes with the
content) and the images its records name, streamed as validation reads them; for another folder (a model), each
file's relative path (symlinked subfolders walked too, as the steps read them) and where each symlink leads. What each
file and image is known by is `Identities`: a local image by its stat data, never read, which keeps the key cheap for
multi-GB checkpoints and image sets; an `s3://` image (named by an S3 dataset or a local one) by its size and ETag,
never downloaded, from the dataset's listing for one under its prefix, else from one HEAD request (`HEAD_THREADS` of
them at once, their answers taken in record order). The dataset file is read once (to hash and to parse it: an S3
object's size and ETag come from its listing, and its one GET streams its records) and each image it names is looked up once, wherever it lies (in an output folder, under
.git/, in a shared mount of millions of files or in another bucket, of which only the named ones count), and nothing
else beside it is looked at: a code edit or a `pip install` beside a dataset at a checkout's root, a README under an
S3 dataset's prefix, is no reason to validate again. An image a record names that is not there is "missing" in the
key, so its arrival is a change; a record that does not parse adds nothing but its text, already in the sha256 (or the
ETag), and the reason validation will give (which can name where a symlink led). An image by http(s) or data: URL is
its URI, part of the file's text: a URL's content changed in place is not seen. With S3 out of reach (a listing, a
read, a HEAD) the key is one no run has had: there is nothing to compare, so nothing is reused, and the step runs and
names the outage.

The stat data is what git's index compares: size, mtime, and the change time and inode, which no tool sets back.
Size and mtime alone miss a file replaced by one of the same size and mtime (a release of a dataset unpacked over
the last from archives that give every file one date, copied with cp -p or rsync -t); the change time moves with
every write, copy and utime. Still missed: a same-size rewrite within the clock tick (milliseconds) of the stat an
earlier key took (git's "racy" case, which git settles by reading such files again). A copy on another disk is
another inode: its first run there is not reused from elsewhere.

A folder walk leaves out what the flow writes (`skip`: its output folder, a rejects file, DVC's repository files): a
model folder holding them would otherwise get a new key from every run's own writes, and never be reused. So is what
version control and other tools write there (`NOT_DATA`): a commit or a fetch is no reason to validate again. A
key walks without a word (`quiet`): a folder reached twice, or a file a folder holds under two names, is read once, and
the step that reads it says so; said by its key too, the flow's log named each twice.

An `s3://` param that is not a dataset is refused, with the fix: no step passes one (its model, config and run folder
are local by the time it runs).

A change to any word here is a new key for every existing run's cached steps, which then all run again: make one on
purpose only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from collections import deque
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vlmops.config import StorageConfig
from vlmops.data.formats import DATASET_SUFFIXES, dataset_files, dataset_objects, iter_dataset
from vlmops.data.image_paths import REMOTE_PREFIXES
from vlmops.data.problems import RecordProblem
from vlmops.errors import UserInputError
from vlmops.folders import walk
from vlmops.hashing import sha256_file
from vlmops.outages import is_transient, unreachable_service
from vlmops.storage import REQUESTS_AT_ONCE, Listing, S3Object, is_partial, list_uri, parse_s3_uri, stat_object

# Folders and files that version control, DVC, Python, notebooks, linters and file browsers write, at any depth, left
# out of a folder walk. Exact names only: every other dotfile (`.gitkeep`, `.gitignore`) is data. A file the folder
# holds through a link into one of them (DVC's symlink cache under .dvc/cache, git-annex's under .git/annex) is
# still in: the link is a file of the folder, stat'ed at its target.
NOT_DATA = frozenset(
    {
        *(".git", ".hg", ".svn", ".dvc"),  # version control; DVC's cache, tmp and config
        *("__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".mypy_cache", ".ruff_cache"),  # caches, autosaves
        *(".DS_Store", "Thumbs.db"),  # file browsers' folder views
    }
)


def stat_data(path: Path) -> str:
    """Size, mtime, ctime and inode of the file at `path` (symlinks followed), NUL-separated."""
    return _stat_fields(path.stat())


def _stat_fields(found: os.stat_result) -> str:
    return f"{found.st_size}\0{found.st_mtime_ns}\0{found.st_ctime_ns}\0{found.st_ino}"


# The errors `Path.is_file` takes for "no file there" (pathlib's own list, and a NUL byte); any other (a folder it may
# not read) is raised, as it was when the key asked `is_file` first.
NO_FILE = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


def image_stat_data(path: str) -> str:
    """`stat_data` of the image file at `path`, or "missing" where there is none (nothing there, or not a file), from
    one stat."""
    try:
        found = os.stat(path)  # noqa: PTH116 (a string: a Path per image is parsed for nothing)
    except OSError as err:
        if err.errno in NO_FILE:
            return "missing"
        raise
    except ValueError:
        return "missing"
    return _stat_fields(found) if stat.S_ISREG(found.st_mode) else "missing"


def folder_file_data(path: Path) -> str | None:
    """The key's words for a file a folder walk lists: where a symlink leads and the stat data of the file at its end
    ("missing" for a broken link), "not a file" for a fifo or socket, from one lstat for a file that is not a link; None
    for a name gone since the walk listed it.

    A broken link or a fifo is in the key: a step that would read it refuses it (vlmops.folders), so the folder must
    not reuse the result of the folder without it."""
    try:
        found = os.lstat(path)
    except OSError as err:
        if err.errno in NO_FILE:
            return None
        raise
    if stat.S_ISREG(found.st_mode):
        return f"\0{_stat_fields(found)}"
    if not stat.S_ISLNK(found.st_mode):
        return "\0not a file"
    target = image_stat_data(str(path))  # stat follows every link, with is_file's answers
    # A broken link, or a loop (which resolve() raises on), by the target it names.
    return f"\0-> {path.readlink() if target == 'missing' else path.resolve()}\0{target}"


def folder_stat_fingerprint(folder: Path, skip: Collection[Path] = ()) -> str:
    """Relative path and stat data (size, mtime, ctime, inode) of every file below `folder` and where each symlink
    leads, but those in or at a path of `skip` (absolute), tool metadata (`NOT_DATA`) and partial S3 downloads (a
    killed run's, removed by the next download)."""
    folder = folder.resolve()
    inside = {path for path in skip if folder in path.parents}  # a folder inside a written one is read whole
    lines: list[tuple[Path, str]] = []
    # A symlinked folder is walked as the steps read it (vlmops.folders), each real folder once (a link back up the
    # tree is not followed round, and left for the step to name: `quiet`); where it leads is part of the key too.
    walked = walk(folder, keep=lambda path: path.name not in NOT_DATA and path.resolve() not in inside, quiet=True)
    for links, files in walked:
        lines += [(link, f"\0-> {link.resolve()}") for link in links]
        for path in files:
            if path.name in NOT_DATA or path in inside or is_partial(path):
                continue
            if (data := folder_file_data(path)) is not None:
                lines.append((path, data))
    h = hashlib.sha256()
    for path, data in sorted(lines):  # each path once: no two tuples compare their data
        h.update(f"{path.relative_to(folder).as_posix()}{data}\n".encode())
    return h.hexdigest()


URLS = tuple(prefix for prefix in REMOTE_PREFIXES if prefix != "s3://")
"""Images by URL whose content the key does not look up: an http(s) server gives no identity a key could rely on, and
a data: URI is its content."""


def object_data(obj: S3Object) -> str:
    """An S3 object's size and ETag, NUL-separated: S3 gives an object a new ETag with new content."""
    return f"{obj.size}\0{obj.etag}"


def s3_object_data(uri: str, storage: StorageConfig | None) -> str:
    """`object_data` of the object at `uri` from one HEAD (`stat_object`), "missing" where there is none, or why S3
    would not say (no credentials, access refused, not an object's URI): validation refuses the image for the same
    reason, and a fix is a change. A failure that may pass (a 5xx, throttling, no answer) is raised."""
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        found = stat_object(uri, storage)
    except NoCredentialsError:
        return "refused: no credentials"
    except ClientError as err:
        if is_transient(err):
            raise
        return f"refused: {err.response.get('Error', {}).get('Code', '')}"
    except ValueError as err:
        return f"refused: {err}"
    return "missing" if found is None else object_data(found)


HEAD_THREADS = REQUESTS_AT_ONCE
"""HEAD requests one key has in flight at once: each image that no listing answers for (those beside one S3 object,
those in another bucket) costs a round trip, and a thousand of them one after another were a thousand round trips'
wait. The key's words still go in record order, whichever answer comes first."""
LOOKAHEAD = 4 * HEAD_THREADS
"""Lines of the key that may wait for their HEAD while the records after them are read: enough to keep every thread
busy, few enough that memory does not grow with the file."""

Words = str | Future[str]
"""An image's words in the key, or the HEAD that will give them."""


@dataclass
class Identities:
    """What one key knows the files it reads by, each looked up once: a dataset file by its content (a local one's
    sha256, an S3 object's size and ETag), an image by what changes with it (a local one's stat data, an S3 object's
    size and ETag, from HEAD_THREADS requests at once; an http(s) or data: URL by nothing but itself, in its file's
    text). Used as a context manager: its threads end with it.

    `listing`: the listing of the S3 dataset being keyed (`list_uri`), which answers for the objects it holds without
    a HEAD each; one under its prefix that it does not hold is missing. `storage`: the S3 server."""

    storage: StorageConfig | None = None
    listing: Listing | None = None
    _listed: dict[tuple[str, str], S3Object] = field(default_factory=dict, init=False)
    _images: dict[str, Words] = field(default_factory=dict, init=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.listing is not None:
            self._listed = {(self.listing.bucket, obj.key): obj for obj in self.listing.objects}

    def __enter__(self) -> Identities:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:  # a key that failed leaves the HEADs not yet sent unsent
            self._pool.shutdown(cancel_futures=True)

    def dataset_file(self, file: Path | str) -> str:
        if isinstance(file, Path):
            return sha256_file(file)
        listed = self._listed_data(file)
        return listed if listed is not None else s3_object_data(file, self.storage)

    def image(self, uri: str, named_at: str) -> Words | None:
        """The key's words for the image at `uri` (absolute, as validation resolved it), or the HEAD that will give
        them; None for a URL. `named_at`: the record that names it first (file:line or file[index]), for an error."""
        if uri.startswith(URLS):
            return None
        if uri not in self._images:
            self._images[uri] = self._s3_image(uri, named_at) if uri.startswith("s3://") else image_stat_data(uri)
        return self._images[uri]

    def _s3_image(self, uri: str, named_at: str) -> Words:
        listed = self._listed_data(uri)
        if listed is not None:
            return listed
        if self._pool is None:
            self._pool = ThreadPoolExecutor(HEAD_THREADS, thread_name_prefix="image-head")
        head = self._pool.submit(self._head, uri, named_at)
        head.add_done_callback(lambda done: self._settle(uri, done))
        return head

    def _head(self, uri: str, named_at: str) -> str:
        try:
            return s3_object_data(uri, self.storage)
        except Exception as err:  # raised in the key's own thread, which did not send this request: say which it was
            err.add_note(f"while looking up image {uri} (named at {named_at}) for a cache key")
            raise

    def _settle(self, uri: str, head: Future[str]) -> None:
        """Keep a HEAD's answer, not the request: a dataset of a million images would hold a million of them."""
        if not head.cancelled() and head.exception() is None:
            self._images[uri] = head.result()

    def _listed_data(self, uri: str) -> str | None:
        """The words for the object at `uri` where they need no request: from the listing, "missing" under its prefix
        and not in it, or why `uri` names no object; None where only a HEAD can tell."""
        try:
            bucket, key = parse_s3_uri(uri)  # as validation reads it: `s3://b/a/` is the object a
        except ValueError as err:
            return f"refused: {err}"
        if (obj := self._listed.get((bucket, key))) is not None:
            return object_data(obj)
        listing = self.listing
        if listing is not None and not listing.single and bucket == listing.bucket and key.startswith(listing.folder):
            return "missing"  # the listing holds every object under its prefix
        return None


def dataset_fingerprint(
    file: Path | str, allowed_roots: Sequence[str] = (), identities: Identities | None = None
) -> str:
    """The dataset file's content (a local file's sha256, an `s3://` object's size and ETag), then each image its
    records name (once, as validation resolves it: its path or URI and `Identities.image`), and the reason for each
    record validation will refuse before opening its images, in record order. An S3 object's records are streamed as
    validation reads them."""
    if identities is None:
        with Identities() as own:
            return dataset_fingerprint(file, allowed_roots, own)
    h = hashlib.sha256(f"{identities.dataset_file(file)}\n".encode())
    if PurePosixPath(os.fspath(file)).suffix.lower() not in DATASET_SUFFIXES:
        return h.hexdigest()  # validation refuses the file by its name, whatever it holds
    seen: set[str] = set()
    lines: deque[tuple[str, Words]] = deque()  # each line of the key, as its start and its words (or their HEAD)
    # The same call as RecordChecker.check_file: the same parsing, path rules and roots.
    for entry in iter_dataset(file, [Path(root) for root in allowed_roots], identities.storage):
        if isinstance(entry.result, RecordProblem):
            # Its text is in the content; the reason may name what the text does not (where a symlink led).
            lines.append(("", str(entry.result)))
        else:
            for image in entry.result.images:
                if image.uri in seen:
                    continue
                seen.add(image.uri)
                if (words := identities.image(image.uri, entry.location)) is not None:
                    lines.append((f"{image.uri}\0", words))  # a local one absolute, every link followed
        _hash_lines(h, lines, LOOKAHEAD)
    _hash_lines(h, lines, 0)
    return h.hexdigest()


def _hash_lines(h: Any, lines: deque[tuple[str, Words]], waiting: int) -> None:
    """Hash the lines at the front of `lines` whose words are known; wait for a HEAD's answer while more than `waiting`
    lines are left (0: all of them)."""
    while lines:
        start, words = lines[0]
        if isinstance(words, Future):
            if not words.done() and len(lines) <= waiting:
                return
            words = words.result()  # a failed HEAD raises here, in record order, as it did when they went one by one
        lines.popleft()
        h.update(f"{start}{words}\n".encode())


def dataset_folder_fingerprint(
    folder: Path, allowed_roots: Sequence[str] = (), storage: StorageConfig | None = None
) -> str:
    """Each dataset file of a dataset folder, as validation lists them (`dataset_files`: the same walk, order and
    refusals, without its warnings: validation gives them): its path in the folder and its `dataset_fingerprint`
    (`storage`: the S3 server of its s3:// images). A folder validation refuses (no dataset files in it, a broken
    link among them) is its reason: the step runs, and fails with it."""
    try:
        files = [Path(file) for file in dataset_files([folder], quiet=True)]  # a local folder's: paths
    except (FileNotFoundError, UserInputError) as err:
        return f"refused: {err}"
    h = hashlib.sha256()
    with Identities(storage) as identities:
        for file in files:
            key = dataset_fingerprint(file, allowed_roots, identities)
            h.update(f"{file.relative_to(folder).as_posix()}\0{key}\n".encode())
    return h.hexdigest()


def s3_dataset_fingerprint(uri: str, allowed_roots: Sequence[str] = (), storage: StorageConfig | None = None) -> str:
    """An `s3://` dataset object, or the dataset objects under a prefix, as validation lists them (`list_uri`, then
    `dataset_objects`: one listing): each object's URI and its `dataset_fingerprint`, whose images under the prefix the
    listing answers for (a README beside the parts is in no key). A URI validation refuses (no bucket, nothing
    there, no dataset objects, credentials refused) is its reason, as a folder's refusal is."""
    try:
        listing = list_uri(uri, storage)
        files = dataset_objects(uri, listing)
    except (FileNotFoundError, UserInputError, ValueError) as err:
        return f"refused: {err}"
    h = hashlib.sha256()
    try:
        with Identities(storage, listing) as identities:
            for file in files:
                h.update(f"{file}\0{dataset_fingerprint(file, allowed_roots, identities)}\n".encode())
    except FileNotFoundError:  # an object deleted since the listing: the dataset is changing, and no key is its own
        return f"changing: {uuid.uuid4()}"
    return h.hexdigest()


def fingerprint(
    value: Any,
    dataset: bool,
    allowed_roots: Sequence[str] = (),
    skip: Collection[Path] = (),
    storage: StorageConfig | None = None,
) -> str | None:
    """The key's words for the files behind one param (see the module docstring); None for None."""
    if value is None:
        return None
    try:
        return _files_fingerprint(str(value), dataset, allowed_roots, skip, storage)
    except Exception as err:
        if not is_transient(err) and unreachable_service(err) is None:
            raise
        # S3 out of reach (a listing, a dataset object, an image's HEAD): there is nothing to compare, so the key is
        # one no run has had: nothing is reused, and the step runs and names the outage.
        return f"unreachable: {uuid.uuid4()}"


def _files_fingerprint(
    value: str, dataset: bool, allowed_roots: Sequence[str], skip: Collection[Path], storage: StorageConfig | None
) -> str:
    if value.startswith("s3://"):
        if not dataset:  # no step passes one: its models, configs and run folders are local by the time it runs
            raise ValueError(
                f"{value}: the cache key follows an s3:// param only as a dataset; list the param in FileContents' "
                "datasets, or give the key a fingerprint of what the step reads there"
            )
        return s3_dataset_fingerprint(value, allowed_roots, storage)
    path = Path(value).expanduser()
    if path.is_dir():
        return (
            dataset_folder_fingerprint(path, allowed_roots, storage) if dataset else folder_stat_fingerprint(path, skip)
        )
    if path.is_file():
        if not dataset:
            return sha256_file(path)
        with Identities(storage) as identities:
            return dataset_fingerprint(path, allowed_roots, identities)
    return f"missing:{path}"
