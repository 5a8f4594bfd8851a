"""Dataset files: the seed's `conversations` format and the `messages` + `images` format, json or jsonl.

Every rejected record is reported with its file, line (jsonl) or index (json), field and reason; nothing
is dropped without being listed. A file's records are decoded by `vlmops.data.jsonrecords` and parsed by
`vlmops.data.parsing` (their images by `vlmops.data.image_paths`); their problems are `vlmops.data.problems`'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmops.conversation import Conversation, ImageRef, to_img_tags
from vlmops.data.image_paths import ImagePaths, image_roots
from vlmops.data.jsonrecords import json_list_records, jsonl_records
from vlmops.data.parsing import parse_record_with, refuse_unread_keys
from vlmops.data.problems import RecordError, RecordProblem
from vlmops.folders import files_under, refuse_unreadable

DATASET_SUFFIXES = (".json", ".jsonl")


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
    """Parse a .json (list of records) or .jsonl (one record per line) dataset file into memory.

    For a file of any size use `iter_dataset`, which holds one record at a time.
    """
    conversations: list[Conversation] = []
    problems: list[RecordProblem] = []
    for entry in iter_dataset(path, roots):
        if isinstance(entry.result, RecordProblem):
            problems.append(entry.result)
        else:
            conversations.append(entry.result)
    return DatasetFile(Path(path), conversations, problems)


def iter_dataset(path: str | os.PathLike[str], roots: Sequence[Path] = ()) -> Iterator[Entry]:
    """Every record of a dataset file in order, parsed or with its problem; a .jsonl file is read a line
    at a time. Local image paths must stay inside the file's folder or one of `roots`."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"dataset file {file} does not exist (check data.train / data.eval)")
    suffix = file.suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        raise ValueError(f"{file}: unsupported dataset file type {suffix!r}; use .json (a list) or .jsonl")
    paths = ImagePaths(file.parent, image_roots(file.parent, roots))  # this scan's, forgotten with it
    for location, number, raw, value in jsonl_records(file) if suffix == ".jsonl" else json_list_records(file):
        if isinstance(value, RecordProblem):
            yield Entry(location, number, raw, value)
            continue
        try:
            refuse_unread_keys(value)
            result: Conversation | RecordProblem = parse_record_with(value, location, paths)
        except RecordError as err:
            result = RecordProblem(location, err.field, err.reason)
        yield Entry(location, number, raw, result)


def dataset_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The .json/.jsonl files that `paths` name: files as given, folders searched (sorted, recursively).

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without dataset files.
        UserInputError: a dataset file given or in a folder is a broken link or no file (a named pipe).
    """
    files: list[Path] = []
    for spec in paths:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = files_under(path, reads=lambda p: p.suffix.lower() in DATASET_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no .json or .jsonl dataset files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            refuse_unreadable([path] if path.is_symlink() or path.exists() else [])  # a broken link: where it leads
            raise FileNotFoundError(f"{path} does not exist: pass .json/.jsonl dataset files or folders of them")
    return files


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
