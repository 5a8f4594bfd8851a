"""Capturing a CUDA graph the way all of vlmops' graphs are (the fast engine's decode step, the frozen vision towers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def capture(
    run: Callable[[], T], pool: Any, after_warmup: Callable[[], None] | None = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """A graph of `run` and what the captured call returned (its static output).

    One eager run on a side stream comes first (cuBLAS and attention set-up, compilation happen outside the
    capture), as CUDA graph capture requires; `after_warmup` undoes what that run changed, if anything. The capture
    is thread-local: the engine's image threads may pin host memory meanwhile. `pool`: the memory pool the graphs of
    one owner share (`torch.cuda.graph_pool_handle()`).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = run()
    return graph, output
