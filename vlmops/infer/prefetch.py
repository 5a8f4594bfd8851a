"""A bounded, ordered look-ahead over a thread pool: the host work of a job runs ahead of the GPU.

`Executor.map` submits every item at once (it would read a whole shard of images into memory before the
first answer); this keeps at most `ahead` items in flight and hands results back in input order, so the
consumer sees the same sequence it would without threads.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

# Threads for a job's host work (reading, decoding, preprocessing images): one per core, up to 8.
HOST_THREADS = min(8, os.cpu_count() or 1)

T = TypeVar("T")
R = TypeVar("R")


def prefetched(pool: Executor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[Future[R]]:
    """`fn(item)` on `pool` for each item, at most `ahead` submitted and not yet taken; futures in item order.

    Items are pulled from `items` in the consumer's thread. Closing the iterator early cancels what has not
    started yet.
    """
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, ahead):
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        for future in pending:
            future.cancel()
