"""The contract between batch inference and whatever generates the tokens.

A job prepares `GenerationRequest`s (prompt token ids from the `deepseek` template, images already decoded,
in placeholder order) and hands an iterator of them to an `Engine`; the engine yields one
`GenerationResult` per request, in any order (a continuous-batching engine finishes short answers first),
each carrying the request's `key` back. The engine pulls requests lazily, so a job over millions of
records never holds more than the engine's working set.

Engines:
- `PlainEngine` (vlmops.infer.plain_engine): `model.generate` on fixed batches; any device, any sampling
  setting of `infer.*`. The reference the others are checked against.
- `FastEngine` (vlmops.infer.fast_engine): CUDA; batched prefill through the whole VLM, then the language model
  decodes alone from a static KV cache with CUDA graphs, finished rows replaced by waiting prompts. Greedy or
  sampled with `generate`'s logits processors, each request's draws from its own seed (vlmops.infer.sampling).

`make_engine` picks one from `infer.engine`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from PIL import Image

from vlmops.config import InferConfig, no_room_for_a_prompt
from vlmops.errors import UserInputError
from vlmops.infer.shards import PROMPT_STEP
from vlmops.models.loading import LoadedModel
from vlmops.plural import counted

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationRequest:
    """One prompt to answer. `key` is opaque to the engine and comes back on the result; `seed` starts the stream the
    fast engine draws this request's tokens from when it samples (a job derives it from `infer.seed` and the record's
    key)."""

    key: Any
    prompt_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)
    seed: int = 0


@dataclass
class GenerationResult:
    """The answer to one request: its tokens (EOS excluded) and why generation stopped."""

    key: Any
    token_ids: list[int]
    finish_reason: FinishReason


class Engine(Protocol):
    @property
    def max_context(self) -> int | None:
        """Prompt + answer tokens one request may take (None: no limit of the engine's own). A job sends a longer
        record to its rejects rather than to the engine."""
        ...

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        """One result per request, in any order; pulls `requests` lazily."""
        ...


def merge_adapter(loaded: LoadedModel) -> LoadedModel:
    """`loaded` with a LoRA adapter loaded on top of its weights (a `vlmops sft` LoRA run, `models:/...` of one)
    merged into them, in memory (peft's `merge_and_unload`; the run folder is unchanged): the fast engine decodes
    plain weights. A model without an adapter is left as it is."""
    from peft import PeftModel

    if isinstance(loaded.model, PeftModel):
        log.info("merging the LoRA adapter into the weights for the fast engine (in memory)")
        loaded.model = loaded.model.merge_and_unload()
    return loaded


DEFAULT_CONTEXT = 2048
"""The fast engine's slot size where neither `infer.max_context` nor the job's prompts give one (three images and
their text with a 64-token answer)."""
CONTEXT_STEP = PROMPT_STEP
"""Slots hold a multiple of this many tokens (a job's plan counts prompts in the same steps)."""


def refuse_context_without_room(max_context: int, max_new_tokens: int) -> None:
    """Refuse a request size of `max_context` tokens that holds no prompt beside an answer of `max_new_tokens`: every
    record would be refused, one by one (the job's rejects; the fast engine's slots). The config's own check
    (`InferConfig.max_context`), for settings that reach here without it (a model's saved `infer.max_new_tokens`, an
    engine built in code).

    Raises:
        UserInputError: naming both keys and what to change.
    """
    if problem := no_room_for_a_prompt(max_context, max_new_tokens):
        raise UserInputError(problem)


def slot_tokens(tokens: int) -> int:
    """`tokens` rounded up to a whole number of CONTEXT_STEP."""
    return -(-tokens // CONTEXT_STEP) * CONTEXT_STEP


def slot_context(loaded: LoadedModel, infer_cfg: InferConfig, longest_prompt: int | None = None) -> int:
    """Tokens one slot of the fast engine holds: `infer.max_context` where set; else the job's longest prompt and
    `infer.max_new_tokens`, rounded up to a multiple of 128 and at most the model's `max_position_embeddings` (a
    longer record goes to the rejects); else 2048."""
    if infer_cfg.max_context is not None:
        return infer_cfg.max_context
    if longest_prompt is None:
        return DEFAULT_CONTEXT
    context = slot_tokens(longest_prompt + infer_cfg.max_new_tokens)
    limit = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and context > limit:
        log.warning(
            "the job's longest prompt (%d tokens) and infer.max_new_tokens %d exceed the model's %d positions: "
            "slots hold %d, and longer records go to the rejects",
            longest_prompt,
            infer_cfg.max_new_tokens,
            limit,
            limit,
        )
        return int(limit)
    return context  # where a few long records make it long, the job says so when it plans (JobPlan.slot_advice)


def make_engine(
    loaded: LoadedModel, infer_cfg: InferConfig, longest_prompt: int | None = None, records: int | None = None
) -> Engine:
    """The engine `infer.engine` names; `auto` is the fast one on CUDA for `records` (what the job has left to answer
    here; None: unknown, as large) of at least `infer.fast_min_records`, else plain.

    `longest_prompt`: a job's longest prompt in tokens (its plan counts them), which sizes the fast engine's slots
    when `infer.max_context` is not set (`slot_context`).

    Raises:
        UserInputError: `fast` asked for where it cannot run (no CUDA).
    """
    choice = infer_cfg.engine
    on_cuda = loaded.device.type == "cuda"
    if choice == "auto":
        small = records is not None and records < infer_cfg.fast_min_records
        choice = "fast" if on_cuda and not small else "plain"
        if on_cuda and records is not None and small:
            log.info(
                "%s to answer: the plain engine (below infer.fast_min_records=%d the fast engine's compiling "
                "costs more than it saves; set infer.engine=fast to have it anyway)",
                counted(records, "record"),
                infer_cfg.fast_min_records,
            )
    if choice == "fast":
        if not on_cuda:
            raise UserInputError(f"infer.engine=fast needs a CUDA device (the model is on {loaded.device}); use plain")
        # Imported here: the fast engine pulls in CUDA-graph machinery that a CPU job never needs.
        from vlmops.infer.fast_engine import FastEngine

        merge_adapter(loaded)

        return FastEngine(  # type: ignore[no-any-return,unused-ignore]
            loaded,
            infer_cfg,
            max_batch=infer_cfg.max_batch,
            max_context=slot_context(loaded, infer_cfg, longest_prompt),
            memory_gib=infer_cfg.memory_gib,
            decode_window=infer_cfg.decode_window,
            lookahead=infer_cfg.lookahead,
            column_bucket=infer_cfg.column_bucket,
            vision_graphs=infer_cfg.vision_graphs,
            prefill_graphs=infer_cfg.prefill_graphs,
            sam_attention=infer_cfg.sam_attention,
            sam_compile=infer_cfg.sam_compile,
            siglip_compile=infer_cfg.siglip_compile,
            overlap_prefill=infer_cfg.overlap_prefill,
        )
    from vlmops.infer.plain_engine import PlainEngine

    return PlainEngine(loaded, infer_cfg)
