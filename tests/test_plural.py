"""Counts in words: singular for one, plural for any other count, the noun of "N of M" agreeing with M."""

from __future__ import annotations

from vlmops.plural import counted, counted_of


def test_one_is_singular_and_every_other_count_plural() -> None:
    assert [counted(n, "shard") for n in (0, 1, 2)] == ["0 shards", "1 shard", "2 shards"]
    assert [counted(n, "entry", "entries") for n in (1, 3)] == ["1 entry", "3 entries"]


def test_of_a_total_the_noun_agrees_with_the_total() -> None:
    assert [counted_of(d, t, "shard") for d, t in ((0, 1), (1, 1), (1, 3), (3, 3))] == [
        "0 of 1 shard",
        "1 of 1 shard",
        "1 of 3 shards",
        "3 of 3 shards",
    ]
