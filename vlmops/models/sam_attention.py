"""SAM's attention without its dense relative-position bias (frozen or training towers, GPU).

The 7b's high-resolution tower is SAM-B at 1,024 px. transformers' SDPA attention for it (`SamVisionSdpaAttention`)
materialises the decomposed relative-position bias as a dense [batch, heads, tokens, tokens] tensor and passes it to
SDPA as a mask: in each of the four global-attention layers that is 12 x 4,096 x 4,096 values per image (~400 MB in
bf16), written by a broadcasting add, copied once more by a reshape, then read back by the only SDPA kernel that takes
a dense bias (the memory-efficient one); the windowed layers do the same per 14 x 14 window. On an H200 those adds and
copies were ~70 ms of each 7b LoRA training step of 8 images (bench/RESULTS.md, session 13). The bias is a sum of two
small tables, one per image axis (`rel_h[query, key row]` + `rel_w[query, key column]`), so two ways avoid it:

- **folded** (`use_folded_sam_attention`): the tables become extra dimensions of the query and the key. The query
  gets `rel_h / scale` and `rel_w / scale` appended, each key a one-hot of its row and of its column, so that
  `scale * (q' . k') = scale * (q . k) + rel_h[q, row(k)] + rel_w[q, column(k)]`, exactly the biased score; SDPA
  then runs its fused kernels (no mask) over head_dim + height + width dimensions (64 + 64 + 64 for SAM-B's global
  layers). The sum is taken in the kernel's float32 accumulator instead of a bf16 bias tensor.
- **flex** (`use_flex_sam_attention`): FlexAttention adds the tables to each score inside its kernel (`score_mod`).
  Measured slower than transformers' attention in batch inference (session 11), kept for comparison.

Each swaps the forward of SAM's attention layers (per instance); `restore_sam_attention` undoes either. Both compute
the same function as transformers' (CPU tests compare them in float32 with the reference kernel).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vlmops.models.tower_compile import Backend, set_tower_compiled

log = logging.getLogger(__name__)

Attend = Callable[..., torch.Tensor]
Tables = Callable[[int, torch.Tensor], torch.Tensor]
"""(grid size, a layer's rel_pos_h or rel_pos_w) -> the [query, key, head_dim] table SAM's attention adds from."""

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


SAM_ATTENTION = ("sdpa", "folded", "flex")


def set_sam_attention(model: Any, kind: str) -> int:
    """SAM's attention in `model` as `kind` (one of `SAM_ATTENTION`) names it, undoing whatever an earlier call set:
    "sdpa" is transformers' own. Returns how many layers now run another forward than transformers'."""
    if kind not in SAM_ATTENTION:
        raise ValueError(f"sam_attention={kind!r}: use {', '.join(SAM_ATTENTION)}")
    restore_sam_attention(model)
    if kind == "folded":
        return use_folded_sam_attention(model)
    if kind == "flex":
        return use_flex_sam_attention(model)
    return 0


def use_flex_sam_attention(model: Any, attend: Attend | None = None, min_tokens: int = FLEX_MIN_TOKENS) -> int:
    """Give each SAM attention layer of `model` with relative positions the FlexAttention forward; returns how many.

    `attend` is the FlexAttention function to use (default: compiled on the GPU); grids of fewer than `min_tokens`
    tokens keep transformers' forward; a layer already changed is left as it is."""
    changed = _swap_forwards(model, lambda module: _flex_forward(module, module.forward, attend, min_tokens))
    if changed:
        log.debug("SAM attention with FlexAttention in %d layers", changed)
    return changed


def use_folded_sam_attention(model: Any) -> int:
    """Give each SAM attention layer of `model` with relative positions the folded forward (`folded_sam_attention`);
    returns how many. A layer already changed (either way) is left as it is. The folded forward is plain
    differentiable tensor work, so it also runs where the layer trains."""
    changed = _swap_forwards(model, lambda module: _folded_forward(module, module.forward))
    if changed:
        log.debug("SAM attention with the relative positions folded into the query and key in %d layers", changed)
    return changed


def _swap_forwards(model: Any, make: Callable[[Any], Callable[..., Any]]) -> int:
    """Set `make(layer)` as the forward of each SAM attention layer with relative positions not yet changed."""
    changed = 0
    for module in model.modules():
        if not getattr(module, "use_rel_pos", False) or not hasattr(module, "get_decomposed_rel_pos"):
            continue
        if getattr(module.forward, "sam_attention", None):
            continue
        module.forward = make(module)
        changed += 1
    return changed


def restore_sam_attention(model: Any) -> int:
    """Undo `use_flex_sam_attention` or `use_folded_sam_attention`: each changed layer runs transformers' forward again;
    returns how many."""
    restored = 0
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "sam_attention", None):
            del module.forward  # the instance's forward shadowed the class's
            restored += 1
    return restored


def _flex_forward(
    module: Any, original: Callable[..., Any], attend: Attend | None, min_tokens: int
) -> Callable[..., Any]:
    tables = _tables_of(module)  # resolved here, not in the (compiled) forward

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
        return flex_sam_attention(module, hidden_states, attend or compiled_flex_attention(), tables), None

    forward.sam_attention = "flex"  # type: ignore[attr-defined]
    return forward


def _folded_forward(module: Any, original: Callable[..., Any]) -> Callable[..., Any]:
    tables = _tables_of(module)  # resolved here, not in the (compiled) forward

    def forward(hidden_states: torch.Tensor, output_attentions: bool | None = False) -> Any:
        if output_attentions:
            return original(hidden_states, output_attentions=output_attentions)
        return folded_sam_attention(module, hidden_states, tables), None

    forward.sam_attention = "folded"  # type: ignore[attr-defined]
    return forward


def folded_sam_attention(module: Any, hidden_states: torch.Tensor, tables: Tables | None = None) -> torch.Tensor:
    """transformers' `SamVisionSdpaAttention.forward` (its output) with the bias folded into the query and key.

    `hidden_states`: [batch, height, width, channels] (a window or the whole grid); returns the same shape."""
    batch, height, width, _ = hidden_states.shape
    heads, tokens = module.num_attention_heads, height * width
    query, key, value, rel_h, rel_w = _attention_terms(module, hidden_states, tables or _tables_of(module))
    head_dim = query.shape[-1]
    scale = head_dim**-0.5  # SDPA's default for the unfolded query, SAM's `scale`
    # Key t sits at row t // width and column t % width of the grid: its one-hots pick rel_h's and rel_w's term.
    # Zero dimensions pad the folded width to a multiple of 8 (what the fused kernels take).
    position = torch.arange(tokens, device=query.device)[:, None]
    pad = -(head_dim + height + width) % 8
    one_hots = torch.cat(
        (
            position // width == torch.arange(height, device=query.device),
            position % width == torch.arange(width, device=query.device),
            position.new_zeros(tokens, pad, dtype=torch.bool),
        ),
        dim=-1,
    ).to(query.dtype)
    folded_query = torch.cat((query, rel_h / scale, rel_w / scale, query.new_zeros(batch, heads, tokens, pad)), -1)
    folded_key = torch.cat((key, one_hots.expand(batch, heads, tokens, -1)), dim=-1)
    # The value keeps its width: SDPA's cuDNN and memory-efficient kernels take a narrower value than query and key
    # (on an H200 cuDNN ran 8 images' global attention in 1.38 ms so, 1.77 with the value padded to match).
    out = F.scaled_dot_product_attention(folded_query, folded_key, value, scale=scale)
    out = out.reshape(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return module.proj(out)


def _attention_terms(module: Any, hidden_states: torch.Tensor, tables: Tables) -> tuple[torch.Tensor, ...]:
    """Query, key and value [batch, heads, tokens, head_dim], split from the fused projection as transformers does, and
    the decomposed bias's tables for each query: rel_h [batch, heads, tokens, height] (its term for each key row) and
    rel_w [batch, heads, tokens, width] (for each key column), from the unscaled query as transformers computes them."""
    batch, height, width, _ = hidden_states.shape
    heads, tokens = module.num_attention_heads, height * width
    qkv = module.qkv(hidden_states).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    table_h = tables(height, module.rel_pos_h)  # [query row, key row, head_dim]
    table_w = tables(width, module.rel_pos_w)  # [query column, key column, head_dim]
    grid = query.reshape(batch, heads, height, width, -1)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, table_h).reshape(batch, heads, tokens, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, table_w).reshape(batch, heads, tokens, width)
    return query, key, value, rel_h, rel_w


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """transformers' `SamVisionAttention.get_rel_pos(size, size, rel_pos)` (queries and keys on one grid, as in SAM's
    self-attention): the table resized to 2 x size - 1 positions, then row `q - k + size - 1` for each query and key,
    with the indices made on the table's device. transformers makes them on the CPU, which a CUDA graph capture cannot
    copy over (hence `memoise_rel_pos` in vlmops.models.vision_graphs) and torch.compile splits its graph at."""
    positions = 2 * size - 1
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).transpose(1, 2), size=positions, mode="linear")
    resized = resized.reshape(-1, positions).permute(1, 0)
    index = torch.arange(size, device=rel_pos.device)
    return resized[index[:, None] - index[None, :] + (size - 1)]


def _tables_of(module: Any) -> Tables:
    """How the swapped forward gets `module`'s relative-position tables: `rel_pos_table` where the layer's class keeps
    transformers' `get_rel_pos` (the one it reproduces), else the layer's own."""
    from transformers.models.sam.modeling_sam import SamVisionAttention

    if getattr(type(module), "get_rel_pos", None) is SamVisionAttention.get_rel_pos:
        return rel_pos_table
    return lambda size, rel_pos: module.get_rel_pos(size, size, rel_pos)


def flex_sam_attention(
    module: Any, hidden_states: torch.Tensor, attend: Attend, tables: Tables | None = None
) -> torch.Tensor:
    """transformers' `SamVisionSdpaAttention.forward` (its output, not its weights) with the bias inside `attend`.

    `hidden_states`: [batch, height, width, channels] (a window or the whole grid); returns the same shape."""
    batch, height, width, _ = hidden_states.shape
    heads = module.num_attention_heads
    query, key, value, rel_h, rel_w = _attention_terms(module, hidden_states, tables or _tables_of(module))

    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        # key kv_idx sits at row kv_idx // width, column kv_idx % width of the grid
        return score + rel_h[b, h, q_idx, kv_idx // width] + rel_w[b, h, q_idx, kv_idx % width]

    # FlexAttention's default scale, 1 / sqrt(head_dim), is SAM's `scale`
    out = attend(query, key, value, score_mod=score_mod)
    out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return module.proj(out)


def set_sam_compiled(model: Any, on: bool, backend: Backend = "inductor") -> int:
    """The 7b's SAM tower of `model` (its VLM's `high_res_vision_model`) run through torch.compile (`on`) or eagerly,
    undoing an earlier call; returns how many towers are compiled now.

    With the relative positions folded (no dense bias) the tower is matmuls, two SDPA calls a layer and the elementwise
    work around them (layer norms, GELU, window partitions, the folded query and key), which the compiler fuses: on an
    H200, 8 images at 1,024 px took 25.4 ms compiled against 43.0 eagerly (bench/RESULTS.md, session 14). The image
    count is a dynamic size, so the engine's prefill batches of any count share one compiled graph. The first call
    compiles (~20 s for SAM-B on an H200): that is done before any CUDA graph is captured, by the capture's warm-up
    run. A tower the compiler fails on runs eagerly from then on, with a warning. A tower already compiled with the same
    backend keeps its compiled forward (each engine built over the model calls this: no compiling the tower again)."""
    towers = [m.high_res_vision_model for m in _with_sam_tower(model)]
    return set_tower_compiled(towers, on, backend, "SAM tower")


def _with_sam_tower(model: Any) -> list[Any]:
    return [m for m in model.modules() if isinstance(getattr(m, "high_res_vision_model", None), torch.nn.Module)]
