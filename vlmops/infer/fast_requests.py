"""A FastEngine request's way to the GPU (vlmops.infer.fast_engine): checked against the engine's limits, then its
images preprocessed on the engine's image threads ahead of the GPU.

The threads run the image processor's resize and padding, to uint8 (the rescale and normalise happen on the device as
a table lookup: vlmops.models.pixels), pinned on CUDA; a bounded look-ahead, so requests are still pulled lazily.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlmops.errors import UserInputError
from vlmops.infer.engine import GenerationRequest
from vlmops.infer.prefetch import prefetched
from vlmops.plural import counted

if TYPE_CHECKING:
    from vlmops.infer.fast_engine import FastEngine


@dataclass
class Prepared:
    """A request with its images' pixel tensors (host memory, pinned on CUDA)."""

    request: GenerationRequest
    pixels: dict[str, torch.Tensor]


def prepared_requests(
    engine: FastEngine, requests: Iterable[GenerationRequest], pool: ThreadPoolExecutor
) -> Iterator[Prepared]:
    """Requests with their pixel tensors, preprocessed by `pool` up to a bounded look-ahead."""
    checked = (_check(engine, request) for request in requests)
    ahead = max(2 * engine.slots, 2 * engine.prefill_batch)
    for future in prefetched(pool, functools.partial(_preprocess, engine), checked, ahead):
        start = time.perf_counter()
        prepared = future.result()
        engine.stats.image_wait_s += time.perf_counter() - start
        yield prepared


def _check(engine: FastEngine, request: GenerationRequest) -> GenerationRequest:
    length = len(request.prompt_ids)
    if length == 0:
        raise UserInputError(f"request {request.key!r} has an empty prompt")
    if length + engine.max_new_tokens > engine.max_context:
        raise UserInputError(
            f"request {request.key!r}: {length} prompt tokens + max_new_tokens {engine.max_new_tokens} exceed "
            f"the engine's max_context {engine.max_context}; raise max_context or shorten the prompt"
        )
    image_tokens = sum(1 for token in request.prompt_ids if token == engine.image_token_id)
    if image_tokens != len(request.images) * engine.num_image_tokens:
        images = counted(len(request.images), "image")
        raise UserInputError(
            f"request {request.key!r} has {counted(image_tokens, 'image token')} for {images} "
            f"({engine.num_image_tokens} per image); encode the prompt with vlmops.models.template.encode"
        )
    return request


def _preprocess(engine: FastEngine, request: GenerationRequest) -> Prepared:
    if not request.images:
        return Prepared(request, {})
    if engine.device_pixels is not None:  # uint8: rescale and normalise happen on the device
        pixels = engine.device_pixels.host(request.images)
    else:
        features = engine.loaded.processor.image_processor(request.images, return_tensors="pt")
        pixels = {name: value.to(engine.dtype) for name, value in features.items()}
    if engine.device.type == "cuda":
        pixels = {name: value.pin_memory() for name, value in pixels.items()}
    return Prepared(request, pixels)
