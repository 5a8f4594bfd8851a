"""The contract between batch inference and whatever generates the tokens.

A job prepares `GenerationRequest`s (prompt token ids from the `deepseek` template, images already decoded,
in placeholder order) and hands an iterator of them to an `Engine`; the engine yields one
`GenerationResult` per request, in any order (a continuous-batching engine finishes short answers first),
each carrying the request's `key` back. The engine pulls requests lazily, so a job over millions of
records never holds more than the engine's working set.

Engines:
- `PlainEngine` (vlmops.infer.plain_engine): `model.generate` on fixed batches; any device, any sampling
  setting of `infer.*`. The reference the others are checked against.
- `FastEngine` (vlmops.infer.fast_engine): CUDA, greedy; batched prefill through the whole VLM, then the
  language model decodes alone from a static KV cache with CUDA graphs, finished rows replaced by waiting
  prompts.

`make_engine` picks one from `infer.engine`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from PIL import Image

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationRequest:
    """One prompt to answer. `key` is opaque to the engine and comes back on the result."""

    key: Any
    prompt_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class GenerationResult:
    """The answer to one request: its tokens (EOS excluded) and why generation stopped."""

    key: Any
    token_ids: list[int]
    finish_reason: FinishReason


class Engine(Protocol):
    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        """One result per request, in any order; pulls `requests` lazily."""
        ...
