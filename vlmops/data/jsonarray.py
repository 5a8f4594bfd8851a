"""The items of a JSON array file, one at a time, each with the byte offset and line where it starts.

A `.json` dataset or batch input is one list; `json.loads` on a multi-GB file holds every record (several
times the file's size in Python objects). This reads the file in chunks and decodes one item at a time with
the standard library's decoder (`json.JSONDecoder.raw_decode`), so memory is one chunk plus the largest
item, and it reports where each item starts: a batch job's shard then reads from its first item's byte
offset, as it does in a `.jsonl` file. (ijson streams JSON too, but gives no offsets to resume from.)
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

CHUNK_BYTES = 1 << 20
MAX_ITEM_BYTES = 256 << 20  # one record larger than this is an error, not a reason to read the whole file
# The reason for a value nested deeper than json's parser goes: it recurses per level, up to Python's recursion limit.
TOO_DEEP = "lists and objects nested too deeply to read (at most about 1,000 levels)"
_WHITESPACE = " \t\n\r"
BOM = "\ufeff"
_KINDS = {"{": "dict", '"': "str", "t": "bool", "f": "bool", "n": "NoneType"}


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class JsonArrayError(ValueError):
    """The file is not a JSON list (or not UTF-8): `line` and `column` say where (1-based; 0: the file)."""

    def __init__(self, reason: str, line: int = 0, column: int = 0):
        self.reason = reason
        self.line = line
        self.column = column
        super().__init__(f"line {line} column {column}: {reason}" if line else reason)

    def problem(self) -> str:
        """The reason, worded as for a .jsonl line: a syntax error says so and gives its column."""
        if self.line and not self.reason.startswith("not UTF-8"):
            return f"not valid JSON: {self.reason} at column {self.column}"
        return self.reason


@dataclass(frozen=True)
class ArrayItem:
    index: int
    offset: int  # byte offset of the item's first character in the file
    line: int
    value: Any


def json_array_items(
    stream: Readable, offset: int = 0, line: int = 1, index: int = 0, decoder: json.JSONDecoder | None = None
) -> Iterator[ArrayItem]:
    """Each item of the JSON list in `stream`, read in chunks.

    `stream` is at the start of the file (offset 0), or at an item's offset (as an earlier pass reported it,
    with its line and index) to read from that item on. `decoder` decodes each item (default: the plain one).

    Raises:
        JsonArrayError: not a list, a syntax error, not UTF-8, or an item over MAX_ITEM_BYTES.
    """
    reader = _Reader(stream, offset, line)
    if offset == 0:
        first = reader.skip_whitespace()
        if first == BOM:  # bytes counted, but not a column
            reader.consume(1)
            reader.position()
            reader.mark_column = 1
            first = reader.skip_whitespace()
        if first != "[":
            kind = "nothing (an empty file)" if first == "" else _KINDS.get(first, "a number")
            raise JsonArrayError(f"a .json file must be a list of records, not {kind} (use .jsonl for one per line)")
        reader.consume(1)
        if reader.skip_whitespace() == "]":
            reader.consume(1)
            reader.expect_end()
            return
    decoder = decoder or json.JSONDecoder()
    while True:
        start_offset, start_line = reader.position()
        value = reader.decode(decoder)
        yield ArrayItem(index, start_offset, start_line, value)
        index += 1
        following = reader.skip_whitespace()
        if following == "]":
            reader.consume(1)
            reader.expect_end()
            return
        if following != ",":
            raise reader.error("Expecting ',' delimiter" if following else "the list is not closed with ']'")
        reader.consume(1)
        reader.skip_whitespace()


class _Reader:
    """A window of decoded text over the file. `mark` is an index into it whose byte offset, line and column
    are known; it only moves forward, so finding an item's offset costs the text since the last one."""

    def __init__(self, stream: Readable, offset: int, line: int):
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        self.mark = 0
        self.mark_offset = offset
        self.mark_line = line
        self.mark_column = 1
        self.eof = False

    def _where(self, text: str) -> tuple[int, int]:
        """Line and column of the end of `text`, which starts at the mark."""
        newlines = text.count("\n")
        if newlines:
            return self.mark_line + newlines, len(text) - text.rfind("\n")
        return self.mark_line, self.mark_column + len(text)

    def _advance_mark(self) -> None:
        passed = self.text[self.mark : self.pos]
        self.mark_offset += len(passed.encode("utf-8"))
        self.mark_line, self.mark_column = self._where(passed)
        self.mark = self.pos

    def _more(self) -> bool:
        """Read the next chunk onto the window (dropping what is consumed); False at the end of the file."""
        if self.eof:
            return False
        self._advance_mark()
        self.text, self.pos, self.mark = self.text[self.pos :], 0, 0
        data = self.stream.read(CHUNK_BYTES)
        try:
            self.text += self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            line, column = self._where(self.text + data[: err.start].decode("utf-8", "replace"))
            raise JsonArrayError(
                f"not UTF-8 text: byte {data[err.start]:#04x} at column {column} (save the file as UTF-8)", line, column
            ) from None
        self.eof = not data
        return bool(data)

    def position(self) -> tuple[int, int]:
        self._advance_mark()
        return self.mark_offset, self.mark_line

    def skip_whitespace(self) -> str:
        """The next character that is not whitespace ("" at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._more():
                return ""

    def consume(self, count: int) -> None:
        self.pos += count

    def decode(self, decoder: json.JSONDecoder) -> Any:
        """One JSON value at the current position; reads on while the window ends inside it."""
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except RecursionError:  # json's parser recurses per level: the item is too deep whatever follows it
                raise self.error(TOO_DEEP) from None
            except json.JSONDecodeError as err:
                if self.eof:  # the whole rest of the file is in the window: a real error, at err.pos
                    raise self.error(err.msg, err.pos) from None
                if len(self.text) - self.pos > MAX_ITEM_BYTES:
                    raise self.error(f"a record over {MAX_ITEM_BYTES >> 20} MiB (split the file)") from None
                self._more()  # the window may end inside the value: read on and try again
                continue
            self.pos = end
            return value

    def expect_end(self) -> None:
        if self.skip_whitespace():
            raise self.error("Extra data after the list")

    def error(self, reason: str, at: int | None = None) -> JsonArrayError:
        line, column = self._where(self.text[self.mark : self.pos if at is None else at])
        return JsonArrayError(reason, line, column)
