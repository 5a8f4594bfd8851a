"""One dataset record -> a `Conversation`, in either format: the seed's `conversations` (`{from, value}` turns, images
as `<img>path</img>` tags in the text) or `messages` + `images` (`{role, content}` turns, an `<image>` mark per listed
image). The turns are checked (user and assistant alternate, images only in user turns, ...); every problem is a
`RecordError` that names the record's field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmops.conversation import IMAGE_MARK, Conversation, ImageRef, ImageTagError, Message, Part, Role, parse_img_tags
from vlmops.data.image_paths import ImagePaths
from vlmops.data.problems import RecordError
from vlmops.plural import counted

ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
TURN_KEYS = {"conversations": ("from", "value"), "messages": ("role", "content")}


@dataclass(frozen=True)
class Turn:
    """One turn as a record holds it: its role, its text (<img> tags, <image> marks) and the field that holds that
    text, which errors name."""

    role: Role
    text: str
    field: str


def parse_record(
    record: Any,
    location: str,
    base_dir: Path | str,
    require_answer: bool = True,
    roots: Sequence[Path] | None = None,
) -> Conversation:
    """One record in either format -> Conversation, image paths resolved against `base_dir` (a local folder, or the
    `s3://bucket/prefix` a record was read from: relative paths are then keys under it).

    `require_answer=False` also takes records that end with a user turn (prompts for batch inference).
    `roots`: the folders local image paths must resolve into (None: anywhere).
    """
    return parse_record_with(record, location, ImagePaths(base_dir, roots), require_answer)


def parse_turns(
    turns: Sequence[Turn],
    images: Sequence[str],
    base_dir: Path | str,
    require_answer: bool = True,
    roots: Sequence[Path] | None = None,
) -> list[Message]:
    """The turns of a record in a form of its own -> messages, read as `parse_record` reads a `messages` record
    (<img> tags, <image> marks filled from `images` in order, paths resolved and checked, the turns checked), its
    problems named by the record's own fields: each turn's `field`, and `images[i]`. The words are batch inference's
    simple form's (the query and history; a turn is a query or a response), never a turn's number."""
    paths = ImagePaths(base_dir, roots)
    messages = _with_images(turns, _image_queue(images, paths), paths, "the query and history")
    _check_turns(messages, require_answer, [turn.field for turn in turns])
    return messages


def refuse_mixed_formats(record: Any) -> None:
    """Raise RecordError for an `images` list or `messages` beside `conversations`: `parse_record` reads the
    conversations alone, so the prompt would go without them (its images), unseen."""
    if not isinstance(record, dict):
        return
    if "conversations" in record and "images" in record:
        raise RecordError(
            "images",
            "not read beside 'conversations', whose images are <img>path</img> tags in the text: put each image "
            "in an <img> tag, or write the record as messages + images (an <image> mark per image)",
        )
    if "conversations" in record and "messages" in record:
        raise RecordError("messages", "not read beside 'conversations' (a record is in one format): keep one")


def refuse_unread_keys(record: Any) -> None:
    """Raise RecordError for a key `parse_record` would pass over: a turn's field besides its role and text (a
    per-turn `loss` or `name`), an `images` list or `messages` beside `conversations`. Training would go on without
    it, unseen. The record's other top-level fields are kept with it (`Conversation.meta`)."""
    if not isinstance(record, dict):
        return
    refuse_mixed_formats(record)
    form = "conversations" if "conversations" in record else "messages"
    turns = record.get(form)
    role, text = TURN_KEYS[form]
    for i, turn in enumerate(turns if isinstance(turns, list) else []):
        extra = [key for key in turn if key not in (role, text)] if isinstance(turn, dict) else []
        if extra:
            raise RecordError(
                f"{form}[{i}].{extra[0]}",
                f'not read: a turn has "{role}" and "{text}" only, so training would go on without it; remove it',
            )


def parse_record_with(record: Any, location: str, paths: ImagePaths, require_answer: bool = True) -> Conversation:
    """`parse_record`, with the images resolved by `paths`."""
    if not isinstance(record, dict):
        raise RecordError("(record)", f"must be an object, got {type(record).__name__}")
    if "conversations" in record:
        messages = _parse_conversations(record["conversations"], paths)
        meta = {k: v for k, v in record.items() if k != "conversations"}
    elif "messages" in record:
        messages = _parse_messages(record["messages"], record.get("images", []), paths)
        meta = {k: v for k, v in record.items() if k not in ("messages", "images")}
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise RecordError("(record)", f"needs a 'conversations' or 'messages' key (found: {keys})")
    _check_turns(messages, require_answer)
    return Conversation(messages, source=location, meta=meta)


def _parse_conversations(turns: Any, paths: ImagePaths) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("conversations", "must be a non-empty list of {from, value} turns")
    messages = []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        role, value = _role_and_text(turn, field, "from", "value", "each turn")
        parts = [
            paths.resolve(p, f"{field}.value") if isinstance(p, ImageRef) else p
            for p in _img_tags(value, f"{field}.value")
        ]
        messages.append(Message(role, parts))
    return messages


def _img_tags(text: str, field: str) -> list[Part]:
    try:
        return parse_img_tags(text)
    except ImageTagError as err:
        raise RecordError(field, str(err)) from None


def _role_and_text(turn: Any, field: str, role_key: str, text_key: str, what: str) -> tuple[Role, str]:
    """The role and the text of one turn of either format; `field` names it in errors."""
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
        raise RecordError(field, f'{what} needs "{role_key}" and "{text_key}"')
    role = _role(turn[role_key], f"{field}.{role_key}")
    text = turn[text_key]
    if not isinstance(text, str):
        raise RecordError(f"{field}.{text_key}", f"must be a string, got {type(text).__name__}")
    return role, text


def _parse_messages(turns: Any, images: Any, paths: ImagePaths) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("messages", "must be a non-empty list of {role, content} messages")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RecordError("images", "must be a list of image paths or URLs")
    queue = _image_queue(images, paths)
    # A generator: each message's role and content are checked as it is reached, so the first problem is named.
    texts = (
        Turn(*_role_and_text(turn, f"messages[{i}]", "role", "content", "each message"), f"messages[{i}].content")
        for i, turn in enumerate(turns)
    )
    return _with_images(texts, queue, paths, "the messages")


def _image_queue(images: Sequence[str], paths: ImagePaths) -> list[ImageRef]:
    """The `images` list resolved, in order: what a record's <image> marks stand for."""
    return [paths.resolve(ImageRef(uri), f"images[{i}]") for i, uri in enumerate(images)]


def _with_images(turns: Iterable[Turn], queue: list[ImageRef], paths: ImagePaths, marks_in: str) -> list[Message]:
    """Each turn's text as a message: its <img> tags resolved, its <image> marks filled from `queue` in order, every
    mark with an image and every image with a mark (`marks_in` says where the marks are, in the error)."""
    messages = []
    used = 0
    for turn in turns:
        parts: list[Part] = []
        pieces = IMAGE_MARK.split(turn.text)
        for j, piece in enumerate(pieces):
            for part in _img_tags(piece, turn.field):
                parts.append(paths.resolve(part, turn.field) if isinstance(part, ImageRef) else part)
            if j < len(pieces) - 1:
                if used >= len(queue):
                    entries = counted(len(queue), "entry", "entries")
                    raise RecordError(turn.field, f"more <image> tags than the {entries} in images")
                parts.append(queue[used])
                used += 1
        messages.append(Message(turn.role, [p for p in parts if not (isinstance(p, str) and not p)]))
    if used != len(queue):
        listed = counted(len(queue), "image")
        raise RecordError("images", f"{listed} listed but {counted(used, '<image> tag')} in {marks_in}")
    return messages


def _role(value: Any, field: str) -> Role:
    if not isinstance(value, str) or value.lower() not in ROLE_ALIASES:
        raise RecordError(field, f"unknown role {value!r}; use system, user or assistant")
    return ROLE_ALIASES[value.lower()]


def _check_turns(messages: list[Message], require_answer: bool = True, fields: Sequence[str] | None = None) -> None:
    """Refuse turns that do not make a conversation. A dataset record's turn is named by its number under `(turns)`
    ("turn 2 (assistant) is empty"); where the record names its turns' texts itself (`fields`, one a message: the
    simple form's `query` and `history[i][j]`), by that field alone, in the simple form's words (a query, a
    response): a turn number would describe it as the dataset record it is not."""
    first = 1 if messages[0].role == "system" else 0
    turns = messages[first:]
    if not turns:
        raise RecordError("(turns)", "a system message alone is not a conversation")

    def problem(i: int, numbered: str, own: str) -> RecordError:
        """Turn `i`'s problem: by its number under `(turns)` (`numbered`), or by its own field (`own`)."""
        return RecordError(fields[first + i], own) if fields else RecordError("(turns)", numbered)

    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            alternate = f"is {message.role!r} but {expected!r} was expected (turns alternate user/assistant)"
            raise problem(i, f"turn {i + 1} {alternate}", alternate)
        if message.role == "assistant" and message.images:
            raise problem(
                i,
                f"turn {i + 1}: images are only allowed in user turns",
                "images are only allowed in a query, not in a response",
            )
        if not message.text("").strip() and not message.images:
            raise problem(i, f"turn {i + 1} ({message.role}) is empty", "is empty")
    if require_answer and turns[-1].role != "assistant":
        raise RecordError("(turns)", "the conversation must end with an assistant turn (the answer to learn)")
    if any(m.role == "system" for m in turns):
        raise RecordError("(turns)", "a system message may only come first")
