"""A batch job's records, each to one prompt: the record forms it reads, its key, and why one is a reject.

A record is either a dataset record (`conversations` / `messages`, as in training: the model answers the last user
turn, and a final assistant turn, if present, is kept as `reference`) or the simple form

    {"id": "q1", "query": "<img>cat.png</img>What is this?", "images": ["dog.png"], "history": [["hi", "hello"]]}

where `images` fill `<image>` marks of the query and history in order (without any mark they come before
the query's text). Relative image paths resolve against the input file's folder (local inputs only).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmops.conversation import Message
from vlmops.data.jsonarray import TOO_DEEP
from vlmops.data.parsing import Turn, parse_record, parse_turns, refuse_mixed_formats
from vlmops.data.problems import RecordError
from vlmops.infer.shards import RawRecord

ADDED_FIELDS = ("key", "source", "response", "reference", "generated_tokens", "finish_reason", "model")
"""Fields a job adds to every result; an input record that already has one is rejected (rename it)."""


@dataclass
class Prompt:
    """One record ready to answer: its key, the fields to write back, the prompt turns and the reference."""

    key: Any
    source: str
    fields: dict[str, Any]
    messages: list[Message]
    reference: str | None


def _record_object(raw: RawRecord) -> dict[str, Any]:
    """The record's JSON object (a .jsonl line parsed, a .json item as read).

    Raises:
        RecordError: the line is not UTF-8 text or not JSON, or the record not an object.
    """
    if raw.problem is not None:
        raise RecordError("(line)", raw.problem, kind="not_text")
    value = raw.value
    if raw.text is not None:
        try:
            value = json.loads(raw.text)
        except json.JSONDecodeError as err:
            raise RecordError(
                "(line)", f"not valid JSON: {err.msg} at column {err.colno}", kind="malformed_json"
            ) from None
        except RecursionError:  # json's parser recurses per level of nesting, and stops at Python's limit
            raise RecordError("(line)", f"not valid JSON: {TOO_DEEP}", kind="malformed_json") from None
    if not isinstance(value, dict):
        raise RecordError("(record)", f"must be an object, got {type(value).__name__}")
    return value


def _is_id(key: Any) -> bool:
    return isinstance(key, (str, int)) and not isinstance(key, bool)


def reject_key(raw: RawRecord) -> Any:
    """A record's key where it cannot be answered: its `id` where one can be read (as its result's would be), else its
    file and line."""
    try:
        key = _record_object(raw).get("id")
    except RecordError:
        return raw.key_location
    return key if _is_id(key) else raw.key_location


def parse_prompt(raw: RawRecord, base_dir: Path | str, roots: Sequence[Path] | None = None) -> Prompt:
    """One raw record -> the prompt to answer; local image paths resolved against `base_dir` must lie inside
    `roots` (None: anywhere), as a dataset's must (`data.allowed_roots`).

    Raises:
        RecordError: the line is not JSON, not an object, in neither form, or has an invalid field.
    """
    value = _record_object(raw)
    clash = [name for name in ADDED_FIELDS if name in value]
    if clash:
        raise RecordError(clash[0], "is a field batch inference adds to its results; rename it in the input")
    key = value.get("id")
    if key is None:
        key = raw.key_location
    elif not _is_id(key):
        raise RecordError("id", f"must be a string or an integer, got {type(key).__name__}")
    if "conversations" in value or "messages" in value:
        refuse_mixed_formats(value)  # a turn's other keys are harmless here: the result keeps the whole record
        conversation = parse_record(value, raw.location, base_dir, require_answer=False, roots=roots)
        messages = conversation.messages
    elif "query" in value:
        turns, images = _simple_turns(value)
        messages = parse_turns(turns, images, base_dir, require_answer=False, roots=roots)
    else:
        keys = ", ".join(sorted(value)) or "none"
        raise RecordError("(record)", f"needs 'conversations', 'messages' or 'query' (found: {keys})")
    reference = None
    if messages[-1].role == "assistant":
        reference = messages[-1].text("").strip()
        messages = messages[:-1]
    return Prompt(key, raw.location, value, messages, reference)


def _simple_turns(record: dict[str, Any]) -> tuple[list[Turn], list[str]]:
    """The simple form's turns and images, each turn with the field that holds it (`query`, `history[i][0]`, ...),
    for the parser both forms share: a problem names the record's own field, not the `messages` it is read as."""
    query, history, images = record["query"], record.get("history") or [], record.get("images") or []
    if not isinstance(query, str):
        raise RecordError("query", f"must be a string, got {type(query).__name__}")
    if not isinstance(history, list):
        raise RecordError("history", "must be a list of [query, response] string pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RecordError(f"history[{i}]", "must be a [query, response] pair of strings")
    if not isinstance(images, list):
        raise RecordError("images", "must be a list of image paths or URLs")
    for i, image in enumerate(images):
        if not isinstance(image, str):
            raise RecordError(f"images[{i}]", f"must be an image path or URL, got {type(image).__name__}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("system", f"must be a string, got {type(system).__name__}")
    turns: list[Turn] = []
    for i, (asked, answered) in enumerate(history):
        turns += [Turn("user", asked, f"history[{i}][0]"), Turn("assistant", answered, f"history[{i}][1]")]
    # Without marks, the images come before the query's text. A mark in a response counts too: the parse fills it
    # and refuses it there; not counted, the images were put in the query as well, and the reject blamed the query.
    if images and not any("<image>" in text for text in [*(turn.text for turn in turns), query]):
        query = "<image>" * len(images) + query
    turns.append(Turn("user", query, "query"))
    if system is not None:  # ms-swift's query-response form: the record's own system prompt ("" for none)
        turns.insert(0, Turn("system", system, "system"))
    return turns, images
