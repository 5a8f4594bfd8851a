"""Capturing a CUDA graph the way all of vlmops' graphs are (the fast engine's decode step and prefill, the frozen
vision towers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class GraphMemory:
    """What the graphs of one owner share: a memory pool, and the stream they are warmed up and captured on.

    The stream matters beyond the capture: a captured matmul keeps the cuBLAS workspace of the stream it was captured
    on (PyTorch keeps one per stream; cuBLAS kernels use it as scratch). Graphs of two owners that replay at once on two
    streams (the engine's decode steps beside a prefill) must not share it: with one capture stream for all
    (torch.cuda.graph's default) they did, and on an H200 the engine answered wrong tokens or never finished a step
    (bench/RESULTS.md session 12)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()


def capture(
    run: Callable[[], T], memory: GraphMemory, after_warmup: Callable[[], None] | None = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """A graph of `run` and what the captured call returned (its static output).

    One eager run on the owner's stream comes first (cuBLAS and attention set-up, compilation happen outside the
    capture), as CUDA graph capture requires; `after_warmup` undoes what that run changed, if anything. The capture
    is thread-local: the engine's image threads may pin host memory meanwhile.
    """
    current = torch.cuda.current_stream()
    memory.stream.wait_stream(current)
    with torch.cuda.stream(memory.stream):
        run()
    current.wait_stream(memory.stream)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=memory.pool, stream=memory.stream, capture_error_mode="thread_local"):
        output = run()
    return graph, output
