"""SAM's attention with its relative-position bias added inside a FlexAttention kernel (frozen towers, GPU).

The 7b's high-resolution tower is SAM-B at 1,024 px. transformers' SDPA attention for it (`SamVisionSdpaAttention`)
materialises the decomposed relative-position bias as a dense [batch, heads, tokens, tokens] tensor and passes it to
SDPA as a mask: in each of the four global-attention layers that is 12 x 4,096 x 4,096 values per image (~400 MB in
bf16), written, then read back by the only SDPA kernel that takes a dense bias (the memory-efficient one); the
windowed layers do the same per 14 x 14 window. The bias is a sum of two small tables, one per image axis
(`rel_h[query, key row]` + `rel_w[query, key column]`), so FlexAttention adds them to each score inside its kernel
instead (`score_mod`), and nothing of tokens x tokens size is ever stored.

`use_flex_sam_attention(model)` swaps the forward of each SAM attention layer of `model` (per instance). The new
forward computes the same function as transformers' (a CPU test compares it in float32 with the reference kernel); it
takes over only where no gradient flows through the layer and the input is on a GPU (FlexAttention is compiled there:
the uncompiled kernel is a slow reference). Anything else runs transformers' forward as before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

Attend = Callable[..., torch.Tensor]

# Grids of fewer tokens (the windowed layers' 14 x 14 windows) keep transformers' attention: their dense bias is
# small, and FlexAttention over all layers made the 7b's prefill 2.4x slower on an H200 (bench/RESULTS.md session 11).
FLEX_MIN_TOKENS = 1024


@functools.cache
def compiled_flex_attention() -> Attend:
    """FlexAttention compiled once per process. Shapes as torch.compile handles them by default: a second size of a
    dimension compiles once more with that dimension dynamic, so the engine's prefill batches of any image count
    (windows x images) do not each compile a kernel, nor run past the recompile limit into the slow unfused one."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def use_flex_sam_attention(model: Any, attend: Attend | None = None, min_tokens: int = FLEX_MIN_TOKENS) -> int:
    """Give each SAM attention layer of `model` with relative positions the FlexAttention forward; returns how many.

    `attend` is the FlexAttention function to use (default: compiled on the GPU); grids of fewer than `min_tokens`
    tokens keep transformers' forward; a layer already changed is left as it is."""
    changed = 0
    for module in model.modules():
        if not getattr(module, "use_rel_pos", False) or not hasattr(module, "get_decomposed_rel_pos"):
            continue
        if getattr(module.forward, "flex_sam", False):
            continue
        module.forward = _flex_forward(module, module.forward, attend, min_tokens)
        changed += 1
    if changed:
        log.debug("SAM attention with FlexAttention in %d layers", changed)
    return changed


def restore_sam_attention(model: Any) -> int:
    """Undo `use_flex_sam_attention`: each changed layer runs transformers' forward again; returns how many."""
    restored = 0
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "flex_sam", False):
            del module.forward  # the instance's forward shadowed the class's
            restored += 1
    return restored


def _flex_forward(
    module: Any, original: Callable[..., Any], attend: Attend | None, min_tokens: int
) -> Callable[..., Any]:
    def forward(hidden_states: torch.Tensor, output_attentions: bool | None = False) -> Any:
        # A gradient through the layer (its weights train, or a layer before it does) keeps transformers' forward.
        trains = torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(p.requires_grad for p in module.parameters())
        )
        # The compiled kernel runs on a GPU; a given `attend` runs anywhere (the CPU tests' unfused reference).
        runs = hidden_states.is_cuda or attend is not None
        small = hidden_states.shape[1] * hidden_states.shape[2] < min_tokens
        if trains or output_attentions or not runs or small:
            return original(hidden_states, output_attentions=output_attentions)
        return flex_sam_attention(module, hidden_states, attend or compiled_flex_attention()), None

    forward.flex_sam = True  # type: ignore[attr-defined]
    return forward


def flex_sam_attention(module: Any, hidden_states: torch.Tensor, attend: Attend) -> torch.Tensor:
    """transformers' `SamVisionSdpaAttention.forward` (its output, not its weights) with the bias inside `attend`.

    `hidden_states`: [batch, height, width, channels] (a window or the whole grid); returns the same shape."""
    batch, height, width, _ = hidden_states.shape
    heads = module.num_attention_heads
    tokens = height * width
    # [3, batch, heads, tokens, head_dim], as transformers splits its fused projection
    qkv = module.qkv(hidden_states).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    table_h = module.get_rel_pos(height, height, module.rel_pos_h)  # [query row, key row, head_dim]
    table_w = module.get_rel_pos(width, width, module.rel_pos_w)  # [query column, key column, head_dim]
    grid = query.reshape(batch, heads, height, width, -1)  # the unscaled query, as transformers uses it
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, table_h).reshape(batch, heads, tokens, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, table_w).reshape(batch, heads, tokens, width)

    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        # key kv_idx sits at row kv_idx // width, column kv_idx % width of the grid
        return score + rel_h[b, h, q_idx, kv_idx // width] + rel_w[b, h, q_idx, kv_idx % width]

    # FlexAttention's default scale, 1 / sqrt(head_dim), is SAM's `scale`
    out = attend(query, key, value, score_mod=score_mod)
    out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return module.proj(out)
