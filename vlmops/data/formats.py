"""Dataset files: the seed's `conversations` format and the `messages` + `images` format, json or jsonl.

Every rejected record is reported with its file, line (jsonl) or index (json), field and reason; nothing
is dropped without being listed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmops.conversation import Conversation, ImageRef, Message, Part, Role, parse_img_tags, to_img_tags
from vlmops.errors import UserInputError

ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
IMAGE_MARK = re.compile(r"<image>")
REMOTE_PREFIXES = ("http://", "https://", "s3://", "data:")


@dataclass(frozen=True)
class RecordProblem:
    """Why one record was rejected: `file:line field: reason`."""

    location: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location} {self.field}: {self.reason}"


class DatasetError(UserInputError):
    """A dataset file that cannot be used; lists every problem found."""

    def __init__(self, problems: list[RecordProblem], hint: str = ""):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} rejected record(s):\n{shown}{more}" + (f"\n{hint}" if hint else ""))


class RecordError(UserInputError):
    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclass
class DatasetFile:
    """The records of one file that parsed, and the problems of those that did not."""

    path: Path
    conversations: list[Conversation]
    problems: list[RecordProblem]


def read_dataset(path: str | os.PathLike[str]) -> DatasetFile:
    """Parse a .json (list of records) or .jsonl (one record per line) dataset file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"dataset file {file} does not exist (check data.train / data.eval)")
    conversations: list[Conversation] = []
    problems: list[RecordProblem] = []
    for location, record in _records(file, problems):
        try:
            conversations.append(parse_record(record, location, file.parent))
        except RecordError as err:
            problems.append(RecordProblem(location, err.field, err.reason))
    return DatasetFile(file, conversations, problems)


def _records(file: Path, problems: list[RecordProblem]) -> Iterator[tuple[str, Any]]:
    suffix = file.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ValueError(f"{file}: unsupported dataset file type {suffix!r}; use .json (a list) or .jsonl")
    text = file.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            location = f"{file}:{number}"
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(RecordProblem(location, "(line)", f"not valid JSON: {err.msg} at column {err.colno}"))
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}:{err.lineno}: not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(data, list):
        raise ValueError(f"{file}: a .json dataset must be a list of records (use .jsonl for one per line)")
    for index, record in enumerate(data):
        yield f"{file}[{index}]", record


def parse_record(record: Any, location: str, base_dir: Path, require_answer: bool = True) -> Conversation:
    """One record in either format -> Conversation, image paths resolved against `base_dir`.

    `require_answer=False` also takes records that end with a user turn (prompts for batch inference).
    """
    if not isinstance(record, dict):
        raise RecordError("(record)", f"must be an object, got {type(record).__name__}")
    if "conversations" in record:
        messages = _parse_conversations(record["conversations"], base_dir)
        meta = {k: v for k, v in record.items() if k != "conversations"}
    elif "messages" in record:
        messages = _parse_messages(record["messages"], record.get("images", []), base_dir)
        meta = {k: v for k, v in record.items() if k not in ("messages", "images")}
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise RecordError("(record)", f"needs a 'conversations' or 'messages' key (found: {keys})")
    _check_turns(messages, require_answer)
    return Conversation(messages, source=location, meta=meta)


def _parse_conversations(turns: Any, base_dir: Path) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("conversations", "must be a non-empty list of {from, value} turns")
    messages = []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        role, value = _role_and_text(turn, field, "from", "value", "each turn")
        parts = [
            _resolve(p, base_dir, f"{field}.value") if isinstance(p, ImageRef) else p for p in parse_img_tags(value)
        ]
        messages.append(Message(role, parts))
    return messages


def _role_and_text(turn: Any, field: str, role_key: str, text_key: str, what: str) -> tuple[Role, str]:
    """The role and the text of one turn of either format; `field` names it in errors."""
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
        raise RecordError(field, f'{what} needs "{role_key}" and "{text_key}"')
    role = _role(turn[role_key], f"{field}.{role_key}")
    text = turn[text_key]
    if not isinstance(text, str):
        raise RecordError(f"{field}.{text_key}", f"must be a string, got {type(text).__name__}")
    return role, text


def _parse_messages(turns: Any, images: Any, base_dir: Path) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("messages", "must be a non-empty list of {role, content} messages")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RecordError("images", "must be a list of image paths or URLs")
    queue = [_resolve(ImageRef(i), base_dir, "images") for i in images]
    messages = []
    used = 0
    for i, turn in enumerate(turns):
        field = f"messages[{i}]"
        role, content = _role_and_text(turn, field, "role", "content", "each message")
        parts: list[Part] = []
        pieces = IMAGE_MARK.split(content)
        for j, piece in enumerate(pieces):
            for part in parse_img_tags(piece):
                parts.append(_resolve(part, base_dir, f"{field}.content") if isinstance(part, ImageRef) else part)
            if j < len(pieces) - 1:
                if used >= len(queue):
                    raise RecordError(f"{field}.content", f"more <image> tags than the {len(queue)} entries in images")
                parts.append(queue[used])
                used += 1
        messages.append(Message(role, [p for p in parts if not (isinstance(p, str) and not p)]))
    if used != len(queue):
        raise RecordError("images", f"{len(queue)} images listed but {used} <image> tags in the messages")
    return messages


def _role(value: Any, field: str) -> Role:
    if not isinstance(value, str) or value.lower() not in ROLE_ALIASES:
        raise RecordError(field, f"unknown role {value!r}; use system, user or assistant")
    return ROLE_ALIASES[value.lower()]


def _resolve(image: ImageRef, base_dir: Path, field: str) -> ImageRef:
    uri = image.uri
    if not uri:
        raise RecordError(field, "empty image reference <img></img>")
    if uri.startswith(REMOTE_PREFIXES):
        return image
    path = Path(uri).expanduser()
    return ImageRef(str(path if path.is_absolute() else (base_dir / path).resolve()))


def _check_turns(messages: list[Message], require_answer: bool = True) -> None:
    turns = messages[1:] if messages[0].role == "system" else messages
    if not turns:
        raise RecordError("(turns)", "a system message alone is not a conversation")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise RecordError(
                "(turns)",
                f"turn {i + 1} is {message.role!r} but {expected!r} was expected (turns alternate user/assistant)",
            )
        if message.role == "assistant" and message.images:
            raise RecordError("(turns)", f"turn {i + 1}: images are only allowed in user turns")
        if not message.text("").strip() and not message.images:
            raise RecordError("(turns)", f"turn {i + 1} ({message.role}) is empty")
    if require_answer and turns[-1].role != "assistant":
        raise RecordError("(turns)", "the conversation must end with an assistant turn (the answer to learn)")
    if any(m.role == "system" for m in turns):
        raise RecordError("(turns)", "a system message may only come first")


def write_conversations(path: Path, conversations: list[Conversation], image_uri: dict[str, str] | None = None) -> None:
    """Write records in the seed's `conversations` format (jsonl); `image_uri` maps old to new image URIs."""
    mapping = image_uri or {}
    with path.open("w", encoding="utf-8") as f:
        for conv in conversations:
            turns = [
                {
                    "from": m.role,
                    "value": to_img_tags(
                        [ImageRef(mapping.get(p.uri, p.uri)) if isinstance(p, ImageRef) else p for p in m.parts]
                    ),
                }
                for m in conv.messages
            ]
            f.write(json.dumps({**conv.meta, "conversations": turns}, ensure_ascii=False) + "\n")
