"""`PlainEngine`: `model.generate` on fixed batches of `infer.batch_size` requests.

Runs on any device with every sampling setting of `infer.*`; the reference the fast engine is checked
against. Requests are taken from the iterator one batch at a time, so memory holds one batch of prompts
and images however long the job.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import torch

from vlmops.config import InferConfig
from vlmops.infer.engine import GenerationRequest, GenerationResult
from vlmops.infer.generation import answer_tokens, generate, generation_config, model_inputs
from vlmops.models.loading import LoadedModel


class PlainEngine:
    """Left-padded batches through `generate`; results come back in request order."""

    def __init__(self, loaded: LoadedModel, infer_cfg: InferConfig):
        self.loaded = loaded
        self.batch_size = infer_cfg.batch_size
        self.config = generation_config(loaded, infer_cfg)
        self.sampling = infer_cfg.temperature > 0
        self.eos_token_id: int | None = loaded.tokenizer.eos_token_id
        # The positions the language model was built for: past them rotary positions it never saw (transformers
        # computes them anyway, and the answers degrade without an error).
        text_config = loaded.model.config.get_text_config()
        self.max_context: int | None = getattr(text_config, "max_position_embeddings", None)

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        pending = iter(requests)
        while batch := list(islice(pending, self.batch_size)):
            yield from self._generate_batch(batch)

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        images = [image for request in batch for image in request.images]
        inputs = model_inputs(self.loaded, [request.prompt_ids for request in batch], images)
        if self.sampling:
            # `generate` draws from torch's global stream: seeded from the batch's requests, the same batch draws the
            # same answers on a rerun (another batching draws others; the fast engine's draws are per request).
            torch.manual_seed(hash(tuple(request.seed for request in batch)) & 0x7FFFFFFFFFFFFFFF)
        output = generate(self.loaded, inputs, self.config)
        prompt_width = inputs["input_ids"].shape[1]
        results = []
        for request, row in zip(batch, output[:, prompt_width:].tolist(), strict=True):
            tokens = answer_tokens(row, self.eos_token_id)
            if self.eos_token_id is not None and tokens and tokens[-1] == self.eos_token_id:
                results.append(GenerationResult(request.key, tokens[:-1], "stop"))
            else:
                results.append(GenerationResult(request.key, tokens, "length"))
        return results
