"""The bounded look-ahead: results in input order, never more than `ahead` items pulled beyond those taken."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from vlmops.infer.prefetch import in_background, prefetched


def test_order_bound_and_errors() -> None:
    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for item in range(50):
            pulled += 1
            yield item

    def work(item: int) -> int:
        time.sleep(0.001 * (item % 5))  # later items often finish first
        if item == 7:
            raise ValueError("seven")
        return item * 2

    with ThreadPoolExecutor(4) as pool:
        out = []
        for taken, future in enumerate(prefetched(pool, work, source(), ahead=6)):
            assert pulled <= taken + 6
            if taken == 7:
                with pytest.raises(ValueError, match="seven"):
                    future.result()
                continue
            out.append(future.result())
    assert out == [i * 2 for i in range(50) if i != 7]


def test_closing_early_cancels_what_has_not_started() -> None:
    started = []
    gate = threading.Event()

    def work(item: int) -> int:
        started.append(item)
        gate.wait(5)
        return item

    with ThreadPoolExecutor(1) as pool:
        futures = prefetched(pool, work, range(100), ahead=10)
        first = next(futures)
        futures.close()
        gate.set()
        assert first.result() == 0
    assert len(started) <= 2  # the one running when closed (and at most one more), not the ten submitted


def test_in_background_keeps_order_and_the_bound_and_raises_in_the_consumer() -> None:
    made: list[int] = []
    threads: set[str] = set()

    def items() -> Iterator[int]:
        for i in range(50):
            threads.add(threading.current_thread().name)
            made.append(i)
            if i == 40:
                raise ValueError("record 40 is bad")
            yield i

    got = []
    feed = in_background(items(), ahead=4, name="feeder")
    with pytest.raises(ValueError, match="record 40"):
        for item in feed:
            if item == 0:
                time.sleep(0.3)  # the producer runs ahead while the consumer waits, but only `ahead` (+1 in hand)
                assert len(made) <= 4 + 2
            got.append(item)
    assert got == list(range(40))
    assert threads == {"feeder"}


def test_in_background_closed_early_stops_its_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield from range(1_000_000)
        finally:
            closed.set()

    before = threading.active_count()
    feed = in_background(items(), ahead=2)
    assert [next(feed) for _ in range(3)] == [0, 1, 2]
    feed.close()
    assert closed.wait(5)
    assert threading.active_count() == before
