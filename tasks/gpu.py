"""The global concurrency limit `gpu`: a step that loads a model onto the GPUs holds one slot while it runs.

The team stack creates the limit (`GPU_SLOTS` slots, e.g. one per GPU machine of the `gpu` work pool), so two
flow runs on one worker never train, merge or batch-infer at once and the next waits in Prefect, not in a CUDA
out-of-memory error. Where the limit does not exist (the embedded default, the ephemeral API) Prefect skips it.
A limit set to 0 (the pool drained) fails the step at once; a retry of the flow run reuses the finished steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency

GPU_LIMIT = "gpu"


@contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one slot of the `gpu` limit (waiting for it) for the length of the block."""
    with concurrency(GPU_LIMIT, occupy=1):
        yield
