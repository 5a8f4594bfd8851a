"""The in-memory form of one training or chat record: messages made of text and image parts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]

# The seed's inline image tag: <img>path-or-url</img>, anywhere in a user turn.
IMG_TAG = re.compile(r"<img>(.*?)</img>", re.DOTALL)


@dataclass(frozen=True)
class ImageRef:
    """An image by reference: a local path, http(s) URL, s3:// URI or data: URI."""

    uri: str


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
    """Split seed-style text (`<img>a.png</img>What is this?`) into text and image parts."""
    parts: list[Part] = []
    pos = 0
    for match in IMG_TAG.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        parts.append(ImageRef(match.group(1).strip()))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def to_img_tags(parts: list[Part]) -> str:
    """The inverse of `parse_img_tags`."""
    return "".join(f"<img>{p.uri}</img>" if isinstance(p, ImageRef) else p for p in parts)
