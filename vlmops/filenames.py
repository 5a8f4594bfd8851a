"""File and folder names made from names the user or a hub chose (model names, hub ids, revisions)."""

from __future__ import annotations


def safe_name(text: str) -> str:
    """`text` as one path component: `/` becomes `--` (as hub caches spell `owner/name`), any other character
    but ASCII letters, digits, `-`, `_` and `.` becomes `_`, and leading/trailing dots go (no `..`)."""
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "--" if c == "/" else "_" for c in text)
    return out.strip(".") or "_"
