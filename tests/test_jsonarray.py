"""A .json list read one item at a time: the same values as json.loads, each item's byte offset and line, a
read that resumes at any item, and syntax errors at the line and column json.loads names."""

from __future__ import annotations

import io
import json
import random

import pytest

from vlmops.data import jsonarray
from vlmops.data.jsonarray import JsonArrayError, json_array_items


def _items() -> list[object]:
    rng = random.Random(0)
    return [
        {"id": i, "text": "é✓" * rng.randint(0, 40) + "x" * rng.randint(0, 900), "n": [1.5, None, True, {"k": []}]}
        for i in range(300)
    ]


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("chunk", [5, 1000, 1 << 20])
def test_items_offsets_lines_and_resuming(indent: int | None, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonarray, "CHUNK_BYTES", chunk)  # items straddle chunk ends, multi-byte characters too
    items = _items()
    data = b"\xef\xbb\xbf" + json.dumps(items, indent=indent, ensure_ascii=False).encode()
    got = list(json_array_items(io.BytesIO(data)))
    assert [g.value for g in got] == items and [g.index for g in got] == list(range(len(items)))
    for g in got[::37]:
        assert data[g.offset : g.offset + 1] == b"{"
        assert data[: g.offset].count(b"\n") + 1 == g.line
        stream = io.BytesIO(data)
        stream.seek(g.offset)
        rest = list(json_array_items(stream, g.offset, g.line, g.index))
        assert [r.value for r in rest] == items[g.index :]
        assert [(r.offset, r.line) for r in rest] == [(h.offset, h.line) for h in got[g.index :]]


@pytest.mark.parametrize(
    ("data", "line", "column", "reason"),
    [
        (b'[\n  {"a": 1},\n  {"a": }\n]\n', 3, 9, "Expecting value"),
        (b"[1 2]", 1, 4, "Expecting ',' delimiter"),
        (b"[1, 2", 1, 6, "not closed"),
        (b"[1] x", 1, 5, "Extra data"),
        (b'[\n{"v": "caf\xe9"}\n]', 2, 11, "not UTF-8 text: byte 0xe9 at column 11"),
        (b'{"a": 1}', 0, 0, "must be a list of records, not dict"),
        (b"", 0, 0, "not nothing (an empty file)"),
    ],
)
def test_errors_name_line_and_column(data: bytes, line: int, column: int, reason: str) -> None:
    with pytest.raises(JsonArrayError) as info:
        list(json_array_items(io.BytesIO(data)))
    assert (info.value.line, info.value.column) == (line, column)
    assert reason in info.value.reason


def test_empty_and_padded_lists() -> None:
    assert list(json_array_items(io.BytesIO(b"  [ \n ]  \n"))) == []
    assert [i.value for i in json_array_items(io.BytesIO(b"[1,\n2]"))] == [1, 2]
