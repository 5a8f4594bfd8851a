"""The records of a dataset file as JSON values, read strictly: a .jsonl file a line at a time, a .json list streamed
(`vlmops.data.jsonarray`). A file is a local path or an `s3://bucket/key` object, read as its bytes arrive (one GET,
never held whole).

A line that is not UTF-8 or not valid JSON, a .json file that does not parse, or an object with a key twice (json would
keep the last value and drop the others) is a `RecordProblem` in the record's place, at its file:line or file[index];
what the values say is `vlmops.data.parsing`'s to read.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from vlmops.config import StorageConfig
from vlmops.data.jsonarray import BOM, CHUNK_BYTES, TOO_DEEP, JsonArrayError, json_array_items
from vlmops.data.problems import RecordError, RecordProblem


def lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The stream's lines, each with its newline (the last one may lack it); works on S3 bodies too, whose own
    iteration yields chunks, not lines. A line longer than a chunk is joined once, not grown chunk by chunk."""
    parts: list[bytes] = []  # the line so far
    for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
        *whole, rest = chunk.split(b"\n")
        for line in whole:
            parts.append(line)
            yield b"".join(parts) + b"\n"
            parts = []
        if rest:
            parts.append(rest)
    if parts:
        yield b"".join(parts)


@contextmanager
def open_dataset_file(file: Path | str, storage: StorageConfig | None = None) -> Iterator[IO[bytes]]:
    """A binary stream of a dataset file: a local path, or an `s3://bucket/key` URI (`storage`: the server)."""
    if isinstance(file, str) and file.startswith("s3://"):
        from vlmops.storage import open_object

        with open_object(file, storage) as body:
            yield body
        return
    with Path(file).open("rb") as f:
        yield f


def jsonl_records(file: Path | str, storage: StorageConfig | None = None) -> Iterator[tuple[str, int, Any, Any]]:
    """(location, line, text, value or problem) for each non-blank line of a .jsonl file, read one at a time."""
    decoder = _RecordDecoder()
    with open_dataset_file(file, storage) as f:
        # A local file's own iteration reads lines buffered, in C; an S3 body's yields chunks.
        for number, data in enumerate(f if isinstance(f, io.BufferedIOBase) else lines(f), start=1):
            location = f"{file}:{number}"
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                text = data.decode("utf-8", "replace").rstrip("\r\n")
                yield location, number, text, RecordProblem(location, "(line)", _not_utf8(err, data))
                continue
            if not line.strip():
                continue
            value: Any
            try:
                # json.loads refuses a line that starts with a BOM in its own words; its decoder does not look.
                value = json.loads(line) if line.startswith(BOM) else decoder.checked(decoder.decode(line), location)
            except json.JSONDecodeError as err:
                value = RecordProblem(location, "(line)", f"not valid JSON: {err.msg} at column {err.colno}")
            except RecursionError:  # json's parser recurses per level of nesting, and stops at Python's limit
                value = RecordProblem(location, "(line)", f"not valid JSON: {TOO_DEEP}")
            yield location, number, line, value


def json_list_records(file: Path | str, storage: StorageConfig | None = None) -> Iterator[tuple[str, int, Any, Any]]:
    """(location, index, item, item or problem) for each item of a .json file, streamed (vlmops.data.jsonarray).

    The whole file is checked first: a file that does not parse is one problem, at the line where it breaks,
    and none of its items count (it is not a list of records until it parses). So it is read twice: a local file
    from its start again, an S3 object from the copy kept as its one GET streamed in (`_Copying`)."""
    with open_dataset_file(file, storage) as f, tempfile.SpooledTemporaryFile(SPOOL_BYTES) as copy:
        local = not (isinstance(file, str) and file.startswith("s3://"))
        try:
            for _ in json_array_items(f if local else _Copying(f, copy)):
                pass
        except JsonArrayError as err:
            location = f"{file}:{err.line}" if err.line else str(file)
            yield location, err.line, None, RecordProblem(location, "(file)", err.problem())
            return
        again = f if local else copy
        again.seek(0)
        decoder = _RecordDecoder()
        for item in json_array_items(again, decoder=decoder):
            location = f"{file}[{item.index}]"
            yield location, item.index, item.value, decoder.checked(item.value, location)


SPOOL_BYTES = 16 << 20
"""An S3 .json object's copy (`_Copying`) is kept in memory up to this size, in a temporary file past it."""


class _Copying:
    """An S3 object's body whose bytes are written to `copy` as they are read: read again from there, the object is
    downloaded once, and memory stays flat whatever its size."""

    def __init__(self, body: IO[bytes], copy: IO[bytes]):
        self.body = body
        self.copy = copy

    def read(self, size: int = -1, /) -> bytes:
        data = self.body.read(size)
        self.copy.write(data)
        return data


def _not_utf8(err: UnicodeDecodeError, line: bytes) -> str:
    return f"not UTF-8 text: byte {line[err.start]:#04x} at column {err.start + 1} (save the file as UTF-8)"


class _KeyTwice(dict[str, Any]):
    """A JSON object that had a key more than once (`twice`): json keeps the last value and drops the others."""

    twice = ""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The `object_pairs_hook` of dataset records: a dict, marked when a key repeats (`_refuse_repeated_keys`)."""
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    marked = _KeyTwice(value)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.twice = key
            break
        seen.add(key)
    return marked


class _RecordDecoder(json.JSONDecoder):
    """One file's decoder of records: objects as `_json_object` makes them, and `twice` set when one of them had a
    key twice, so that the walk that names the key (`_refuse_repeated_keys`: a call per value) runs for those records
    alone. json.loads with a hook would also build a decoder per line."""

    def __init__(self) -> None:
        super().__init__(object_pairs_hook=self._object)
        self.twice = False

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = _json_object(pairs)
        if isinstance(value, _KeyTwice):
            self.twice = True
        return value

    def checked(self, value: Any, location: str) -> Any:
        """The record just decoded, or the problem of a key it has twice. A flag left by a value that did not decode
        (a broken line) costs a walk that finds nothing, never a wrong answer."""
        twice, self.twice = self.twice, False
        if twice:
            try:
                _refuse_repeated_keys(value)
            except RecordError as err:
                return RecordProblem(location, err.field, err.reason)
        return value


def _refuse_repeated_keys(value: Any, field: str = "") -> None:
    """Raise RecordError naming a key that appears twice in one object of the record: of the two values json keeps
    the last, so the other would be lost without a word."""
    if isinstance(value, _KeyTwice):
        raise RecordError(
            f"{field}.{value.twice}" if field else value.twice,
            "this key appears twice in one object and only its last value would be read: keep one",
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_repeated_keys(item, f"{field}.{key}" if field else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_repeated_keys(item, f"{field}[{i}]")
