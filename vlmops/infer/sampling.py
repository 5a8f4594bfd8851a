"""How the fast engine picks each next token: greedy, or sampled with the settings `generate` applies.

The logits go through transformers' own logits processors, built from `infer.*` as `generate` builds them for the
plain engine (repetition penalty, then temperature, top-k and top-p), on float32 scores as `generate` does. The draw
itself is where the engines differ: `generate` takes `torch.multinomial` from the process's random stream, so an
answer depends on which prompts shared its batch and in what order; here each request has a seed of its own
(`GenerationRequest.seed`, a job derives it from `infer.seed` and the record's key) and the draw for its n-th token
is the Gumbel-max of the processed scores with noise counted from (seed, n). The same prompt and seed give the same
answer whatever the batching, the slot or the resume (in float32 exactly; in bf16 as far as the batching leaves the
logits unchanged), and the draws sample from softmax(scores) as `torch.multinomial` does.

Repetition penalty needs every token a row has seen. The decoder keeps them per slot ([slots, max_context]); the
columns past a row's newest token hold its first prompt token again, so the penalty processor (a gather and scatter
over the ids) sees exactly the row's own ids, one of them repeated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from vlmops.config import InferConfig
from vlmops.models.tower_compile import INDUCTOR_OPTIONS

log = logging.getLogger(__name__)

# A 32-bit integer hash (Chris Wellons' "lowbias32") over (seed, draw, token), on int64 tensors holding 32-bit values:
# the same values on every device and in every batch layout.
_MASK = 0xFFFFFFFF
_SEED_MIX, _DRAW_MIX, _TOKEN_MIX = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _mul32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x * factor mod 2**32 for 32-bit x, in two 16-bit halves of the factor: no int64 product overflows."""
    return ((((x * (factor >> 16)) & 0xFFFF) << 16) + x * (factor & 0xFFFF)) & _MASK


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 values in (0, 1): row r's are a function of (seeds[r], draws[r]) alone, one per token.

    24 random bits a value (float32's mantissa), never exactly 0 or 1."""
    seed = _mix(_mul32(seeds & _MASK, _SEED_MIX) ^ (seeds >> 32 & _MASK))
    row = _mix(seed ^ _mul32(draws & _MASK, _DRAW_MIX))
    tokens = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix(row[:, None] ^ _mul32(tokens, _TOKEN_MIX)[None, :])
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def logits_processors(infer_cfg: InferConfig) -> list[Any]:
    """transformers' logits processors that `generate` applies for these settings, in its order (the plain engine's
    `generation_config`): repetition penalty, then, when sampling, temperature, top-k and top-p."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors: list[Any] = []
    if infer_cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(infer_cfg.repetition_penalty)))
    if infer_cfg.temperature > 0:
        if infer_cfg.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(infer_cfg.temperature)))
        if infer_cfg.top_k > 0:
            processors.append(TopKLogitsWarper(infer_cfg.top_k))
        if infer_cfg.top_p < 1.0:
            processors.append(TopPLogitsWarper(infer_cfg.top_p))
    return processors


class TokenSelector:
    """The next token of each row from its logits: `infer.*`'s processors, then argmax (greedy) or a seeded draw.

    `suppress_token` (EOS when answers must run to max_new_tokens) is never chosen, as `generate`'s min_new_tokens
    masks it. `compile`: the processors and the draw through torch.compile (the rows a dynamic size), which fuses
    their elementwise passes over [rows, vocab] into a few kernels around top-p's sort (on an H200, eagerly, the
    draw's integer hash alone took longer than the 1.3b's whole decode step at 768 rows)."""

    def __init__(self, infer_cfg: InferConfig, suppress_token: int | None = None, compile: bool = False) -> None:
        from transformers.generation.logits_process import TopPLogitsWarper

        processors = logits_processors(infer_cfg)
        # top-p runs as the library's code between two compiled stages: inductor's codegen of its cumsum over a
        # real vocabulary (a split scan, rows dynamic) failed on an H200 with torch 2.11.
        self.top_p = next((p for p in processors if isinstance(p, TopPLogitsWarper)), None)
        self.processors = [p for p in processors if p is not self.top_p]
        self.sampling = infer_cfg.temperature > 0
        self.suppress_token = suppress_token
        self.needs_history = infer_cfg.repetition_penalty != 1.0
        self.plain_greedy = not processors and not self.sampling
        """argmax of the logits as they are: no processor, no draw, no float32 copy."""
        self._scores: Callable[..., torch.Tensor] = self._processed
        self._pick: Callable[..., torch.Tensor] = self._drawn
        if compile and not self.plain_greedy:
            self._scores = _rows_compiled(self._processed)
            self._pick = _rows_compiled(self._drawn)

    def describe(self) -> str:
        if self.plain_greedy:
            return "greedy"
        names = [type(p).__name__ for p in [*self.processors, self.top_p] if p is not None]
        names = [name.removesuffix("LogitsProcessor").removesuffix("LogitsWarper") for name in names]
        return f"{'sampled' if self.sampling else 'greedy'}{' after ' + ', '.join(names) if names else ''}"

    def __call__(
        self,
        logits: torch.Tensor,
        history: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
        draws: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens [rows] for `logits` [rows, vocab]. `history` [rows, columns]: each row's ids so far (repetition
        penalty); `seeds`, `draws` [rows]: each row's seed and the index of the token being drawn (sampling)."""
        if self.plain_greedy:
            if self.suppress_token is not None:
                logits = logits.clone()
                logits[:, self.suppress_token] = float("-inf")
            return logits.argmax(dim=-1)
        scores = self._scores(logits, history)
        if self.top_p is not None:
            scores = self.top_p(history, scores)
        return self._pick(scores, seeds, draws)

    def _processed(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        scores = logits.to(torch.float32, copy=True)  # float32, as `generate` processes them
        if self.suppress_token is not None:
            scores[:, self.suppress_token] = float("-inf")
        for processor in self.processors:
            scores = processor(history, scores)
        return scores

    def _drawn(self, scores: torch.Tensor, seeds: torch.Tensor | None, draws: torch.Tensor | None) -> torch.Tensor:
        if not self.sampling:
            return scores.argmax(dim=-1)
        assert seeds is not None and draws is not None
        # Gumbel-max: argmax(scores + G), G = -log(-log(U)), draws from softmax(scores); filtered tokens stay -inf.
        gumbel = -torch.log(-torch.log(uniform(seeds, draws, scores.shape[-1])))
        return (scores + gumbel).argmax(dim=-1)


def _rows_compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` through torch.compile, its tensors' first dimension (the rows) a dynamic size: one compilation serves
    every row count. A compilation that fails (an inductor bug for some shape) leaves `fn` eager, with a warning: the
    same tokens, slower, rather than a failed job."""
    compiled: list[Callable[..., torch.Tensor]] = [torch.compile(fn, dynamic=None, options=INDUCTOR_OPTIONS)]

    def call(*tensors: torch.Tensor | None) -> torch.Tensor:
        for tensor in tensors:
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        try:
            return compiled[0](*tensors)
        except Exception as err:  # torch._inductor.exc.InductorError and the like
            if compiled[0] is fn:
                raise
            log.warning("sampling: torch.compile failed (%s); picking tokens eagerly", str(err).splitlines()[0])
            compiled[0] = fn
            return fn(*tensors)

    return call
