"""Counts in words: "1 shard", "3 shards", "0 of 1 shard", so that no message says "shard(s)" or "1 records"."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and `noun`, plural but for one: "1 part", "3 parts", "0 parts"; `plural` where adding an s is wrong
    ("entries")."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def counted_of(count: int, total: int, noun: str, plural: str | None = None) -> str:
    """`count` of `total`, the noun agreeing with the total: "0 of 1 shard", "1 of 3 shards"."""
    return f"{count} of {counted(total, noun, plural)}"
