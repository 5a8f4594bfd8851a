"""The bounded look-ahead: results in input order, never more than `ahead` items pulled beyond those taken."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from vlmops.infer.prefetch import prefetched


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
