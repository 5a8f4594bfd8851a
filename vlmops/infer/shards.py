"""Reading a batch job's input files: one scan of each (its content hash, records, shards and prompt lengths), then
a shard's records at a time.

Both file types are read from a shard's byte offset, a line (`.jsonl`) or a list item (`.json`,
vlmops.data.jsonarray) at a time, so a job never holds more than one shard's records; a file on S3 is read with a
ranged GET.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from vlmops.config import StorageConfig
from vlmops.data.image_paths import record_base
from vlmops.data.jsonarray import ArrayItem, JsonArrayError, json_array_items
from vlmops.data.jsonrecords import lines
from vlmops.errors import UserInputError


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, the name its keys use (relative to the input root), and its identity.

    `longest_prompt`: the most prompt tokens (image tokens included) any of its records encodes to, where the scan
    counted them (None: not counted, as in plans written before it was); `longest_line`: that record's line;
    `shortest_prompt`, `shortest_line`: the fewest, and where (None: not counted, or no record could be);
    `prompt_steps`: [steps, records] pairs, how many of its records take `steps` x PROMPT_STEP tokens or fewer (and
    more than one step fewer), ascending.
    """

    uri: str
    name: str
    size: int = 0
    sha256: str = ""
    records: int = 0
    longest_prompt: int | None = None
    longest_line: int | None = None
    prompt_steps: list[list[int]] | None = None
    shortest_prompt: int | None = None
    shortest_line: int | None = None
    only: list[int] | None = None
    """The records the job reads from the file, by line (.jsonl) or list index (.json), ascending: a job over
    another job's rejects (`infer.retry_rejects`); None: every record. `records` counts these alone."""


PROMPT_STEP = 128
"""The prompt lengths' histogram step in a plan (the fast engine rounds its slots up to the same step)."""


@dataclass(frozen=True)
class Shard:
    """A run of consecutive records of one file: the unit written, resumed and handed to a worker.

    `offset` is the byte offset of its first record (the start of its line in a .jsonl file, of the item in a
    .json list) and `line` that line's number; `start` is the index of its first record in the file. Where the
    file's records are chosen (`InputFile.only`), the shard holds `count` of those, from its first one on.
    """

    index: int
    file: int
    start: int
    count: int
    offset: int
    line: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


@dataclass
class RawRecord:
    """One record as read: where it is (`file:line` or `file[index]`; `number` is that line or index) and its
    text (jsonl) or parsed value (json)."""

    location: str
    key_location: str
    number: int
    text: str | None = None
    value: Any = None
    problem: str | None = None
    """Why the line is not text (a byte that is not UTF-8): the record is a reject, never answered with it replaced."""


@contextmanager
def open_input(uri: str, storage: StorageConfig | None = None, offset: int = 0) -> Iterator[IO[bytes]]:
    """A binary stream of the file from `offset` on (a ranged GET on S3)."""
    if uri.startswith("s3://"):
        from vlmops.storage import open_object

        with open_object(uri, storage, offset) as body:
            yield body
        return
    with open(uri, "rb") as f:
        f.seek(offset)
        yield f


PromptMeasure = Callable[[RawRecord, Path | str], int | None]
"""A record's prompt tokens as the job will encode it, given the folder its image paths resolve against; None for a
record the job will reject."""


def scan_input(
    file: InputFile,
    file_index: int,
    shard_size: int,
    storage: StorageConfig | None = None,
    measure: PromptMeasure | None = None,
) -> tuple[InputFile, list[Shard]]:
    """Read a file once: its content hash, its record count, where each of its shards starts and, with `measure`,
    its longest and shortest prompts.

    Shards never cross files, so a shard's records are one ranged read. Memory stays one line (jsonl) or
    one item and a chunk (a .json list).
    Shard indexes are left 0: the job numbers shards across files.
    """
    digest = hashlib.sha256()
    shards: list[Shard] = []
    chosen = frozenset(file.only) if file.only is not None else None
    count = 0  # records read (all of them, or the chosen ones)
    index = 0  # records in the file
    size = 0
    longest, longest_line, steps = 0, 0, collections.Counter[int]()
    shortest: tuple[int, int] | None = None  # (tokens, line)
    base_dir = record_base(file.uri)

    def measured(raw: RawRecord, line: int) -> None:
        nonlocal longest, longest_line, shortest
        assert measure is not None
        tokens = measure(raw, base_dir)
        if tokens is None:  # a reject when the job reads it
            return
        steps[-(-tokens // PROMPT_STEP)] += 1
        if tokens > longest:
            longest, longest_line = tokens, line
        if shortest is None or tokens < shortest[0]:
            shortest = (tokens, line)

    if file.uri.lower().endswith(".jsonl"):
        with open_input(file.uri, storage) as stream:
            for number, line in enumerate(lines(stream), start=1):
                if not _blank(number, line):
                    if chosen is None or number in chosen:
                        if count % shard_size == 0:
                            shards.append(Shard(0, file_index, index, 0, size, number))
                        count += 1
                        if measure is not None:  # a record is only decoded to be counted
                            measured(_line_record(file, number, line), number)
                    index += 1
                digest.update(line)
                size += len(line)
    else:
        with open_input(file.uri, storage) as stream:
            counted = _Counted(stream, digest)
            try:
                for item in json_array_items(counted):
                    if chosen is not None and item.index not in chosen:
                        continue
                    if count % shard_size == 0:
                        shards.append(Shard(0, file_index, item.index, 0, item.offset, item.line))
                    count += 1
                    if measure is not None:
                        measured(_item_record(file, item), item.line)
            except JsonArrayError as err:
                where = f"{file.uri}:{err.line}" if err.line else file.uri
                raise UserInputError(f"{where}: {err.problem()}") from None
            size = counted.size
    # The k-th shard begins at the (k x shard_size)-th record read.
    sized = [
        Shard(0, s.file, s.start, min(shard_size, count - k * shard_size), s.offset, s.line)
        for k, s in enumerate(shards)
    ]
    scanned = InputFile(file.uri, file.name, size, digest.hexdigest(), count, only=file.only)
    if measure is not None:
        histogram = [[step, steps[step]] for step in sorted(steps)]
        scanned = replace(scanned, longest_prompt=longest, longest_line=longest_line or None, prompt_steps=histogram)
        if shortest is not None:
            scanned = replace(scanned, shortest_prompt=shortest[0], shortest_line=shortest[1])
    return scanned, sized


def _blank(number: int, line: bytes) -> bool:
    """Whether a .jsonl line holds no record: whitespace alone (opening the file, after a byte-order mark)."""
    return not (line.removeprefix(codecs.BOM_UTF8) if number == 1 else line).strip()


def _line_record(file: InputFile, number: int, line: bytes) -> RawRecord:
    # A byte-order mark (Windows editors write one) opens the file: not part of the first record. The line ending is
    # not part of it either: a record cut off at its end would be "not valid JSON at column 1" (of the next line).
    encoding = "utf-8-sig" if number == 1 else "utf-8"
    line = line.rstrip(b"\r\n")
    problem = None
    try:
        text = line.decode(encoding)
    except UnicodeDecodeError as err:
        text = line.decode(encoding, "replace")
        problem = f"not UTF-8 text: byte {line[err.start]:#04x} at column {err.start + 1} (save the file as UTF-8)"
    return RawRecord(f"{file.uri}:{number}", f"{file.name}:{number}", number, text, problem=problem)


def _item_record(file: InputFile, item: ArrayItem) -> RawRecord:
    return RawRecord(f"{file.uri}[{item.index}]", f"{file.name}[{item.index}]", item.index, value=item.value)


def read_shard(file: InputFile, shard: Shard, storage: StorageConfig | None = None) -> Iterator[RawRecord]:
    """The shard's records, in file order, each with its location (of the file's chosen records, where it has
    `only`)."""
    chosen = frozenset(file.only) if file.only is not None else None
    if file.uri.lower().endswith(".jsonl"):
        with open_input(file.uri, storage, shard.offset) as stream:
            read = 0
            for number, line in enumerate(lines(stream), start=shard.line):
                if _blank(number, line) or (chosen is not None and number not in chosen):
                    continue
                if read == shard.count:
                    return
                read += 1
                yield _line_record(file, number, line)
        return
    with open_input(file.uri, storage, shard.offset) as stream:
        if shard.offset:  # streamed from the shard's first item
            items = json_array_items(stream, shard.offset, shard.line, shard.start)
        else:  # a plan from before shards knew their offset: read up to the shard
            items = itertools.islice(json_array_items(stream), shard.start, None)
        if chosen is not None:
            items = (item for item in items if item.index in chosen)
        for item in itertools.islice(items, shard.count):
            yield _item_record(file, item)


class _Counted:
    """A stream that hashes and counts the bytes read through it."""

    def __init__(self, stream: IO[bytes], digest: Any):
        self.stream = stream
        self.digest = digest
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data
