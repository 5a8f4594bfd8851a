"""How many of FastEngine's decoding slots fit a GPU memory budget (vlmops.infer.fast_engine).

What a slot takes: its K/V for `max_context` tokens (`StaticDecoder.bytes_per_slot`) and, when tokens are sampled or
penalised, its row's working set over the vocabulary (`pick_bytes`). What the budget keeps beside the slots: the model
already allocated and a prefill's working set (its own K/V, activations, the prefill graphs' static input and the 7b
SAM tower's relative-position bias).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vlmops.errors import UserInputError
from vlmops.infer.fast_decode import StaticDecoder
from vlmops.infer.sampling import TokenSelector

log = logging.getLogger(__name__)

GIB = 2**30

# Bytes per vocabulary entry of a decode step's row while the processors and the draw run (float32 scores, top-p's
# sorted values and int64 indices, its softmax and cumsum, masks, the noise): on an H200 the 1.3b's call of 768 rows
# peaked 5.1 GiB higher sampled (temperature, top-p) than greedy, ~69 bytes a score.
PICK_BYTES_PER_SCORE = 72


def slot_pick_bytes(selector: TokenSelector, model: Any, max_context: int) -> int:
    """Memory a slot's row needs beside its K/V to pick its tokens: nothing for plain greedy; the processors' and the
    draw's working set over the vocabulary, and the ids seen (repetition penalty), otherwise."""
    if selector.plain_greedy:
        return 0
    vocab = int(model.lm_head.weight.shape[0])
    return PICK_BYTES_PER_SCORE * vocab + (max_context * 8 if selector.needs_history else 0)


def fit_slots(
    model: Any,
    device: torch.device,
    dtype: torch.dtype,
    max_context: int,
    prefill_batch: int,
    max_batch: int,
    memory_gib: float | None,
    prefill_graphs: bool = False,
    pick_bytes: int = 0,
) -> int:
    """Slots that fit `memory_gib` next to what is already allocated (the model) and a prefill's working set;
    `pick_bytes`: what each slot's row takes beside its K/V when tokens are sampled or penalised."""
    if device.type != "cuda":
        return max_batch
    if memory_gib is None:
        # No budget given: 90% of what the card has (free + this process's own), never the whole card,
        # or a prefill after the cache is allocated runs out of memory (a 7b's 128 slots of 2048 tokens
        # alone take 125 GiB).
        free, _total = torch.cuda.mem_get_info(device)
        memory_gib = 0.9 * (free + torch.cuda.memory_allocated(device)) / GIB
    per_slot = StaticDecoder.bytes_per_slot(model, max_context) + pick_bytes
    config = model.model.language_model.config
    element = dtype.itemsize
    # A prefill batch holds its own K/V (transformers' cache, until copied into the slots), the hidden
    # states and MLP activations of every token, and the vision towers' activations; 2 GiB covers the
    # towers, the step's logits and allocator slack.
    prefill_tokens = prefill_batch * max_context
    activations = prefill_tokens * (6 * config.hidden_size + 3 * config.intermediate_size) * element
    reserve = per_slot // max_context * prefill_tokens + activations + 2 * GIB
    if prefill_graphs:  # the graphs' static input: a prefill batch's embeddings at max_context
        reserve += prefill_tokens * config.hidden_size * element
    high_res = getattr(model.config, "high_res_vision_config", None)
    if high_res is not None:
        # The 7b's SAM tower materialises a relative-position bias of heads x tokens^2 per image in its
        # global-attention layers (4096 tokens at 1024 px): ~0.4 GiB per image in bf16, twice while built.
        tokens = (high_res.image_size // high_res.patch_size) ** 2
        reserve += 2 * prefill_batch * high_res.num_attention_heads * tokens**2 * element
    used = torch.cuda.memory_allocated(device)
    fit = int((memory_gib * GIB - used - reserve) // per_slot)
    if fit < 1:
        raise UserInputError(
            f"memory_gib={memory_gib} leaves no room for the KV cache: the model takes {used / GIB:.1f} GiB, "
            f"prefill needs ~{reserve / GIB:.1f} GiB and one slot of {max_context} tokens "
            f"{per_slot / GIB:.2f} GiB; raise memory_gib or lower max_context or prefill_batch"
        )
    if fit < max_batch:
        log.info("memory_gib=%s fits %d of %d slots", memory_gib, fit, max_batch)
    return min(max_batch, fit)
