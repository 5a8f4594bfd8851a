"""Bounded, ordered look-aheads: the host work of a job runs ahead of the GPU.

`prefetched`: `Executor.map` submits every item at once (it would read a whole shard of images into memory
before the first answer); this keeps at most `ahead` items in flight and hands results back in input order, so
the consumer sees the same sequence it would without threads.

`in_background`: a whole iterator (parsing, tokenizing, the pool's results) run by a thread of its own, so that
the consumer (the thread that feeds the GPU) takes items that are ready instead of making each one between two
GPU calls while the GPU waits.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
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


_END = object()


def in_background(items: Iterable[T], ahead: int, name: str = "background") -> Generator[T, None, None]:
    """The items of `items`, made by a thread of its own up to `ahead` in front of the consumer, in order.

    An exception raised while making them is raised here, after the items made before it. Closing this iterator
    early (or an exception raised in it: Ctrl-C, a SIGTERM) tells the thread to stop at its next item (and close
    `items`) without waiting for it: the item being made may be a read from a server that does not answer
    (`storage.url_timeout_s`, retried: minutes), and a stop must not wait on it.
    """
    ready: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((_END, err))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    ended = False  # the thread made its last item (or failed): it is closing `items`, and is waited for
    try:
        while True:
            item, err = ready.get()
            if err is not None:
                ended = True
                raise err
            if item is _END:
                ended = True
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if ended:
            thread.join()
