"""Dataset files: the seed's `conversations` format and the `messages` + `images` format, json or jsonl.

Every rejected record is reported with its file, line (jsonl) or index (json), field and reason; nothing
is dropped without being listed. A dataset file is a local path or an S3 object, named by its `s3://bucket/key` URI (a
str: `Path` would make it `s3:/bucket/key`), whose relative image paths are keys under its prefix. A file's records are decoded by `vlmops.data.jsonrecords` and parsed by
`vlmops.data.parsing` (their images by `vlmops.data.image_paths`); their problems are `vlmops.data.problems`'.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from vlmops.config import StorageConfig
from vlmops.conversation import Conversation, ImageRef, to_img_tags
from vlmops.data.image_paths import ImagePaths, image_roots, record_base
from vlmops.data.jsonrecords import json_list_records, jsonl_records
from vlmops.data.parsing import parse_record_with, refuse_unread_keys
from vlmops.data.problems import RecordError, RecordProblem
from vlmops.errors import UserInputError
from vlmops.folders import NAMED, files_under, first_names, refuse_unreadable
from vlmops.plural import counted

if TYPE_CHECKING:
    from vlmops.storage import Listing

DATASET_SUFFIXES = (".json", ".jsonl")

DatasetPath = Path | str
"""A dataset file or folder: a local path, or an `s3://bucket/key` object or `s3://bucket/prefix` (kept as a str)."""


def dataset_path(spec: str | os.PathLike[str]) -> DatasetPath:
    """A dataset path as written: an `s3://` URI as it is, a local path with `~` expanded."""
    text = os.fspath(spec)
    return text if is_s3(text) else Path(text).expanduser()


def is_s3(path: DatasetPath | os.PathLike[str]) -> bool:
    return isinstance(path, str) and path.startswith("s3://")


def is_jsonl(file: DatasetPath) -> bool:
    """Whether a dataset file holds a record per line (else a list: its records are named by index)."""
    return os.fspath(file).lower().endswith(".jsonl")


def file_name(file: DatasetPath) -> str:
    """A dataset file's own name, without its folder or prefix."""
    return os.fspath(file).rpartition("/")[2]


@dataclass
class DatasetFile:
    """The records of one file that parsed, and the problems of those that did not."""

    path: Path
    conversations: list[Conversation]
    problems: list[RecordProblem]


@dataclass(frozen=True)
class Entry:
    """One record as read from a file: where it is, its text or value, and what it parsed to.

    `number` is the line (jsonl, counted from 1) or the list index (json); `raw` the line's text or the
    list item, kept for the rejects file; `result` the conversation, or the problem that rejects it.
    """

    location: str
    number: int
    raw: Any
    result: Conversation | RecordProblem


def read_dataset(path: str | os.PathLike[str], roots: Sequence[Path] = ()) -> DatasetFile:
    """Parse a local .json (list of records) or .jsonl (one record per line) dataset file into memory.

    For a file of any size use `iter_dataset`, which holds one record at a time.
    """
    conversations: list[Conversation] = []
    problems: list[RecordProblem] = []
    for entry in iter_dataset(Path(path), roots):
        if isinstance(entry.result, RecordProblem):
            problems.append(entry.result)
        else:
            conversations.append(entry.result)
    return DatasetFile(Path(path), conversations, problems)


def iter_dataset(
    path: DatasetPath | os.PathLike[str], roots: Sequence[Path] = (), storage: StorageConfig | None = None
) -> Iterator[Entry]:
    """Every record of a dataset file in order, parsed or with its problem; a .jsonl file is read a line at a time, an
    S3 object (`storage`: the server) as it arrives. Local image paths must stay inside the file's folder or one of
    `roots`; a relative one in an S3 object's records is a key under its prefix."""
    file = path if isinstance(path, str) else Path(path)
    suffix = PurePosixPath(os.fspath(file)).suffix.lower()
    if is_s3(file):
        base: Path | str = record_base(str(file))
        paths = ImagePaths(base, image_roots(None, roots))  # local paths only under the roots (a shared mount)
    else:
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"dataset file {file} does not exist (check data.train / data.eval)")
        paths = ImagePaths(file.parent, image_roots(file.parent, roots))  # this scan's, forgotten with it
    if suffix not in DATASET_SUFFIXES:
        raise ValueError(f"{file}: unsupported dataset file type {suffix!r}; use .json (a list) or .jsonl")
    records = jsonl_records(file, storage) if suffix == ".jsonl" else json_list_records(file, storage)
    for location, number, raw, value in records:
        if isinstance(value, RecordProblem):
            yield Entry(location, number, raw, value)
            continue
        try:
            refuse_unread_keys(value)
            result: Conversation | RecordProblem = parse_record_with(value, location, paths)
        except RecordError as err:
            result = RecordProblem(location, err.field, err.reason)
        yield Entry(location, number, raw, result)


def dataset_files(
    paths: Sequence[str | os.PathLike[str]], storage: StorageConfig | None = None, *, quiet: bool = False
) -> list[DatasetPath]:
    """The .json/.jsonl files that `paths` name, each read once: files as given, folders searched (sorted,
    recursively, through their linked subfolders: `vlmops.folders.files_under`); an `s3://` URI names the object whose
    key it is, or the .json/.jsonl objects under it as a prefix, sorted by key (`vlmops.storage.list_uri`, as batch
    inference lists its input; `storage`: the server).

    A file is the one its links lead to (`Path.resolve`); an object, its bucket and key. Two paths that name one file (a
    folder given twice, a file and a folder that holds it, a folder and a link to it, a file and a link to it, an
    object and a prefix above it) are refused: its records would be
    read twice, so training sees them twice and a report counts them twice, and the fix, dropping a path, is the
    user's to make. A file that one folder holds under two names (`b.jsonl -> a.jsonl` beside it) is read once, under
    its first name in sorted order, and the other name logged (`vlmops.folders.first_names`, as batch inference reads
    its input), as the walk reads a folder reached twice: the folder's contents may not be the user's to change (a hub
    snapshot's links, a DVC checkout), and a folder is read as a whole. `quiet`: neither is said (a cache key's listing,
    vlmops.fingerprints: its step says them).

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without dataset files; an S3 bucket that does not
            exist, or a URI with no object at it nor any under it, or none of them .json/.jsonl.
        UserInputError: a dataset file given or in a folder is a broken link or no file (a named pipe); two paths
            name the same file (each such pair named, by position and as written, with the files and the fix); S3
            refused the credentials.
    """
    named: list[dict[DatasetPath, DatasetPath]] = []  # for each path given: each real file it names -> its name
    for spec in paths:
        names: dict[DatasetPath, DatasetPath] = {}
        path = dataset_path(spec)
        if isinstance(path, str):
            names = {uri: uri for uri in _objects_named(path, storage)}
        else:
            names.update(first_names(_files_named(path, quiet), quiet=quiet).items())
        named.append(names)
    shared = [
        _shared_files((i, os.fspath(paths[i]), named[i]), (j, os.fspath(paths[j]), named[j]))
        for i, j in itertools.combinations(range(len(named)), 2)
        if named[i].keys() & named[j].keys()
    ]
    if shared:
        raise UserInputError("\n".join(shared))  # a line per pair
    return [path for names in named for path in names.values()]


def _objects_named(uri: str, storage: StorageConfig | None) -> list[str]:
    """The dataset objects an `s3://` URI names (`dataset_objects` of its listing)."""
    from vlmops.storage import list_uri

    return dataset_objects(uri, list_uri(uri, storage))


def dataset_objects(uri: str, listing: Listing) -> list[str]:
    """The dataset objects of `uri`, as its listing (`vlmops.storage.list_uri`) shows them: the object itself, or the
    .json/.jsonl objects under the prefix, sorted by key.

    Raises:
        FileNotFoundError: nothing at `uri` nor under it, or none of it .json/.jsonl.
    """
    if listing.single:
        return [listing.uri(obj) for obj in listing.objects]
    if not listing.objects:
        raise FileNotFoundError(
            f"{uri} does not exist: no object has this key and none lies under it as a prefix; pass an "
            "s3://bucket/key.jsonl object or the s3://bucket/prefix of .json/.jsonl objects"
        )
    found = [listing.uri(obj) for obj in listing.objects if obj.key.lower().endswith(DATASET_SUFFIXES)]
    if not found:
        shown = ", ".join(listing.name(obj) for obj in listing.objects[:NAMED])
        more = f" and {len(listing.objects) - NAMED} more" if len(listing.objects) > NAMED else ""
        raise FileNotFoundError(
            f"{uri}: no .json or .jsonl dataset objects under this prefix (it holds {shown}{more}); "
            "pass the prefix that holds the dataset's parts"
        )
    return found


def _files_named(path: Path, quiet: bool) -> list[Path]:
    """The dataset files one local path names: itself, or those in the folder."""
    if path.is_dir():
        found = files_under(path, reads=lambda p: p.suffix.lower() in DATASET_SUFFIXES, quiet=quiet)
        if not found:
            raise FileNotFoundError(f"{path}: no .json or .jsonl dataset files in this folder")
        return found
    if path.is_file():
        return [path]
    refuse_unreadable([path] if path.is_symlink() or path.exists() else [])  # a broken link: where it leads
    raise FileNotFoundError(f"{path} does not exist: pass .json/.jsonl dataset files or folders of them")


def _shared_files(
    a: tuple[int, str, dict[DatasetPath, DatasetPath]], b: tuple[int, str, dict[DatasetPath, DatasetPath]]
) -> str:
    """What two dataset paths (position, as written, their files) share, and which to drop."""
    (i, spec_a, files_a), (j, spec_b, files_b) = a, b
    common = [real for real in files_a if real in files_b]
    shown = ", ".join(
        str(files_a[real]) if files_a[real] == files_b[real] else f"{files_a[real]} (as {files_b[real]})"
        for real in common[:NAMED]
    )
    more = f" and {len(common) - NAMED} more" if len(common) > NAMED else ""
    if len(common) == len(files_a) == len(files_b):
        fix = "drop one of them"
    elif len(common) == len(files_b):
        fix = f"drop path {j + 1} (path {i + 1} names each of its files)"
    elif len(common) == len(files_a):
        fix = f"drop path {i + 1} (path {j + 1} names each of its files)"
    else:
        fix = "drop one of them, or take the shared files out of one"
    return (
        f"dataset paths {i + 1} ({spec_a}) and {j + 1} ({spec_b}) both name {counted(len(common), 'file')}, whose "
        f"records would be read twice: {shown}{more}; {fix}"
    )


def record_line(conv: Conversation, image_uri: dict[str, str]) -> str:
    """One record as a jsonl line in the seed's `conversations` format; `image_uri` maps old to new URIs."""
    turns = [
        {
            "from": m.role,
            "value": to_img_tags(
                [ImageRef(image_uri.get(p.uri, p.uri)) if isinstance(p, ImageRef) else p for p in m.parts]
            ),
        }
        for m in conv.messages
    ]
    return json.dumps({**conv.meta, "conversations": turns}, ensure_ascii=False) + "\n"
