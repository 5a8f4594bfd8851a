"""The in-memory form of one training or chat record: messages made of text and image parts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from vlmops.errors import UserInputError

Role = Literal["system", "user", "assistant"]

# The seed's inline image tag: <img>path-or-url</img>, anywhere in a user turn.
OPEN_TAG, CLOSE_TAG = "<img>", "</img>"
TAG = re.compile(r"<img>|</img>")
# ms-swift's mark for one of a record's (or a chat turn's) listed images, filled in order.
IMAGE_MARK = re.compile(r"<image>")


class ImageTagError(UserInputError):
    """An `<img>` tag that is not closed, is nested in another, or closes nothing."""


@dataclass(frozen=True)
class ImageRef:
    """An image by reference: a local path, http(s) URL, s3:// URI or data: URI."""

    uri: str
    field: str = field(default="", compare=False)
    """Where a dataset record names it (`conversations[0].value`, `images[1]`), for error messages."""


Part = str | ImageRef


@dataclass
class Message:
    role: Role
    parts: list[Part]

    @property
    def images(self) -> list[ImageRef]:
        return [p for p in self.parts if isinstance(p, ImageRef)]

    def text(self, image_tag: str = "<image>") -> str:
        """The message's text with each image replaced by `image_tag`."""
        return "".join(image_tag if isinstance(p, ImageRef) else p for p in self.parts)


@dataclass
class Conversation:
    """A whole record. `source` says where it came from (file:line) for error messages."""

    messages: list[Message]
    source: str = ""
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def images(self) -> list[ImageRef]:
        return [img for m in self.messages for img in m.images]


def parse_img_tags(text: str) -> list[Part]:
    """Split seed-style text (`<img>a.png</img>What is this?`) into text and image parts.

    Raises:
        ImageTagError: an `<img>` without its `</img>`, one inside another, or a `</img>` that closes nothing
            (read as plain text, they would train the model on a tag and silently drop the image).
    """
    parts: list[Part] = []
    pos = 0
    opened: int | None = None  # where the open tag's content starts
    for match in TAG.finditer(text):
        if match.group() == OPEN_TAG:
            if opened is not None:
                raise ImageTagError(f"<img> at character {match.start()} is inside another <img> tag (nested tags)")
            if match.start() > pos:
                parts.append(text[pos : match.start()])
            opened = match.end()
        else:
            if opened is None:
                raise ImageTagError(f"</img> at character {match.start()} closes no <img> tag")
            parts.append(ImageRef(text[opened : match.start()].strip()))
            opened = None
            pos = match.end()
    if opened is not None:
        raise ImageTagError(f"<img> at character {opened - len(OPEN_TAG)} is never closed with </img>")
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def to_img_tags(parts: list[Part]) -> str:
    """The inverse of `parse_img_tags`."""
    return "".join(f"<img>{p.uri}</img>" if isinstance(p, ImageRef) else p for p in parts)
