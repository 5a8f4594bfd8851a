"""The decode half of `FastEngine`: a static KV cache and one Llama step over the loaded weights.

The language model of DeepSeek-VL is a plain Llama. Prefill runs through transformers (vision towers,
image features scattered into the prompt, the whole LLM); from then on each row only needs one token per
step, which this module computes itself so that a step has fixed shapes and can be captured once in a
CUDA graph and replayed:

- the KV cache is one buffer, `[layers, 2 (K, V), slots, kv_heads, max_context, head_dim]`; row `s` owns slot
  `s`, its valid length is its position, and attention masks out everything after it;
- `tokens`, `positions` and `active` are static `[slots]` tensors the step reads and updates in place
  (each step writes its next token back into `tokens` and advances the active rows' positions), so a
  replay needs no host-to-device copy; the next token is greedy or sampled (`TokenSelector`,
  vlmops.infer.sampling), from each slot's `seeds` and, for a repetition penalty, the ids it has seen (`history`);
- the arithmetic is transformers' Llama, op for op (RMSNorm in float32, rotary from the model's own
  `rotary_emb`, SDPA with the same scale, SiLU MLP); q/k/v and gate/up run as one matmul each over a
  fused copy of their weights (the modules' parameters become views into it, so no memory is doubled).

A step over `b` rows and `L` cache columns is graph-captured once per `(b, L)` bucket on CUDA; on CPU
it runs eagerly (the float32 equality test runs this same code). With `prefill_graphs` the language model's half of
a prefill (the layers over the prompt embeddings, K/V into the slots, the first tokens) is captured too, once per
(rows, width), in its own memory pool; the caller pads widths to a few buckets. The first tokens are picked from the
graph's logits after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmops.errors import UserInputError
from vlmops.infer.sampling import TokenSelector
from vlmops.models.cuda_graphs import GraphMemory, capture
from vlmops.models.tower_compile import INDUCTOR_OPTIONS
from vlmops.plural import counted

log = logging.getLogger(__name__)


@dataclass
class _PrefillGraph:
    """A captured prefill of `rows` prompts of `width` tokens, and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    embeds: torch.Tensor
    index: torch.Tensor
    lengths: torch.Tensor
    logits: torch.Tensor


# Prefill shapes captured at most (each keeps its static input of rows x width embeddings); beyond, eagerly.
MAX_PREFILL_GRAPHS = 64


@dataclass
class _Layer:
    qkv: torch.Tensor
    o: torch.Tensor
    norm_post: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    norm_next: torch.Tensor  # the norm of this layer's output: the next layer's input norm, or the final norm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (the statistics in float32, the weight applied in x's dtype)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask SDPA makes of a bool one on every call (0 where visible, -inf elsewhere), to build it once."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def pre_attention(
    normed: torch.Tensor,
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k/v projection of the normed input and rotary, one token per row: q [b, H, hd], kv [b, 2, KVH, hd] (K, V).

    The input norm is done by whatever produced the input (`post_attention` of the layer before). q, k and v stay in
    one tensor, so that one kernel ropes q and k and passes v through, and one write puts a row's K and V into the
    cache.
    """
    rows = normed.shape[0]
    h = F.linear(normed, qkv).view(rows, heads + 2 * kv_heads, head_dim)
    roped = rotate(h[:, : heads + kv_heads], cos.unsqueeze(1), sin.unsqueeze(1))
    h = torch.cat((roped, h[:, heads + kv_heads :]), dim=1)
    return h[:, :heads], h[:, heads:].view(rows, 2, kv_heads, head_dim)


def post_attention(
    x: torch.Tensor,
    attn: torch.Tensor,
    o: torch.Tensor,
    norm: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    norm_next: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output projection and residual, the post-attention norm, the SiLU MLP and its residual; returns the new residual
    stream and its norm by `norm_next` (the next layer's input norm, or the final norm).

    The next norm is done here so that the compiler fuses it with the residual add before it (one kernel, not two).
    `attn` is the attention output [batch, heads, tokens, head_dim] as SDPA returns it (tokens 1 in decode);
    it is flattened here, inside the compiled function, so that no view of another tensor is passed in
    (torch.compile guards on a view's base and would recompile for each new prefill shape).
    """
    attn = attn.transpose(1, 2).reshape(x.shape[0], -1)
    x = x + F.linear(attn, o)
    gate, up = F.linear(rms_norm(x, norm, eps), gate_up).chunk(2, dim=-1)
    x = x + F.linear(F.silu(gate) * up, down)
    return x, rms_norm(x, norm_next, eps)


def wide(target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`target` and `source` with each head vector's bytes read as 8-byte elements (bf16: 4 values to an element)
    where both layouts allow it, else both as they are. The same bytes: a copy or scatter between the two views moves
    what the plain one would. Index and copy kernels pay by the element: on an H200 a prefill's K/V scatter into the
    cache ran at 0.98 TB/s on bf16 elements and at 3.2-3.4 on these (1.3b and 7b shapes; bench/RESULTS.md, session
    21)."""
    ratio = 8 // target.element_size()

    def fits(tensor: torch.Tensor) -> bool:
        in_elements = (*tensor.stride()[:-1], tensor.storage_offset(), tensor.shape[-1])
        return tensor.stride(-1) == 1 and all(value % ratio == 0 for value in in_elements)

    if ratio <= 1 or source.dtype != target.dtype or not (fits(target) and fits(source)):
        return target, source
    return target.view(torch.int64), source.view(torch.int64)


def _rows_dynamic(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    """`tensor` with its row dimensions (default the first) compiled as dynamic sizes, every other size fixed. A size of
    1 (a decode step's one token) stays fixed: torch.compile specialises it anyway."""
    for dim in dims or (0,):
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def _fuse(linears: list[Any], where: str) -> torch.Tensor:
    """One weight matrix for several bias-free projections of the same input; the modules keep views into it.

    The views leave the transformers modules (and so the prefill) computing exactly what they did, while
    the decode step reads each layer's q/k/v (and gate/up) weights with one matmul instead of three (two).
    """
    for linear in linears:
        if type(linear) is not nn.Linear:
            raise UserInputError(
                f"{where} is a {type(linear).__name__}, not a plain Linear: FastEngine decodes merged weights; "
                "merge the adapter first (peft's merge_and_unload) or use the plain engine"
            )
        if linear.bias is not None:
            raise UserInputError(f"{where} has a bias; DeepSeek-VL's Llama has none and FastEngine does not add it")
    with torch.no_grad():
        fused = torch.cat([linear.weight for linear in linears])
        start = 0
        for linear in linears:
            rows = linear.weight.shape[0]
            linear.weight.data = fused[start : start + rows]
            start += rows
    return fused


class StaticDecoder:
    """The KV cache of `slots` rows and the decode step over them (graph-captured per shape on CUDA)."""

    def __init__(
        self,
        model: Any,
        slots: int,
        max_context: int,
        cuda_graphs: bool,
        compile_step: bool,
        attention: str,
        selector: TokenSelector,
        prefill_graphs: bool = False,
    ) -> None:
        lm = model.model.language_model
        config = lm.config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UserInputError(f"FastEngine decodes SiLU Llamas; this model's hidden_act is {config.hidden_act!r}")
        if attention not in ("sdpa", "matmul"):
            raise UserInputError(f"attention={attention!r}: use sdpa or matmul")
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.slots = slots
        self.max_context = max_context
        self.attention = attention
        self.selector = selector
        self.layers = []
        next_norms = [layer.input_layernorm.weight for layer in lm.layers[1:]] + [lm.norm.weight]
        for index, (layer, norm_next) in enumerate(zip(lm.layers, next_norms, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            where = f"language_model.layers.{index}"
            self.layers.append(
                _Layer(
                    qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj], f"{where}.self_attn.q/k/v_proj"),
                    o=attn.o_proj.weight,
                    norm_post=layer.post_attention_layernorm.weight,
                    gate_up=_fuse([mlp.gate_proj, mlp.up_proj], f"{where}.mlp.gate/up_proj"),
                    down=mlp.down_proj.weight,
                    norm_next=norm_next,
                )
            )
        self.norm_in = lm.layers[0].input_layernorm.weight  # of the embeddings; each layer norms its own output
        self.embed = lm.embed_tokens.weight
        self.lm_head = model.lm_head.weight
        device, dtype = self.embed.device, self.embed.dtype
        self.device = device
        # The model's own rotary module gives the cos/sin table: the values are elementwise in the position,
        # so a table lookup equals what the model computes for that position.
        with torch.no_grad():
            cos, sin = lm.rotary_emb(self.embed[:1], torch.arange(max_context, device=device)[None])
        self.cos, self.sin = cos[0], sin[0]
        shape = (len(self.layers), 2, slots, self.kv_heads, max_context, self.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=device)  # K and V side by side: one write a layer
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.long, device=device)
        # Each slot's sampling seed, and (repetition penalty) the ids its row has seen: the prompt, then the tokens fed
        # back; the columns past the newest hold the row's first id again (the penalty's gather and scatter see each
        # of the row's ids, one repeated, and nothing else).
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)
        self.history = (
            torch.zeros(slots, max_context, dtype=torch.long, device=device) if selector.needs_history else None
        )
        self.rows = torch.arange(slots, device=device)
        self.columns = torch.arange(max_context, device=device)
        self._norm: Callable[..., torch.Tensor] = rms_norm
        self._pre: Callable[..., tuple[torch.Tensor, torch.Tensor]] = pre_attention
        self._post: Callable[..., tuple[torch.Tensor, torch.Tensor]] = post_attention
        if compile_step:
            # Small functions compiled once for any row count, reused by every layer and every captured shape; the
            # cache writes and attention stay outside, so nothing compiled mutates inputs. Only the row (token)
            # dimensions are dynamic (`_rows_dynamic`): `dynamic=True` made every size symbolic, heads and head_dim
            # too, and the kernels then index with runtime divisions (on an H200 the prefill's rotary kernel took
            # 743 us a layer against 66 us with the sizes fixed).
            # Without inductor's pattern matcher: it turns a residual `x + F.linear(...)` into addmm (always in bf16),
            # which on CUDA is a copy of x plus a GEMM that adds x before rounding (transformers rounds the product
            # first), and the add then cannot fuse into the norm after it (H200, torch 2.11: two copies a layer).
            # With precision casts emulated, a fused kernel rounds each value eager code would store in the model's
            # dtype (the residual sum before the norm that reads it), as transformers' separate kernels do.
            norm = torch.compile(rms_norm, dynamic=None, options=INDUCTOR_OPTIONS)
            pre = torch.compile(pre_attention, dynamic=None, options=INDUCTOR_OPTIONS)
            post = torch.compile(post_attention, dynamic=None, options=INDUCTOR_OPTIONS)
            self._norm = lambda x, *rest: norm(_rows_dynamic(x), *rest)
            self._pre = lambda normed, qkv, cos, sin, *rest: pre(
                _rows_dynamic(normed), qkv, _rows_dynamic(cos), _rows_dynamic(sin), *rest
            )
            self._post = lambda x, attn, *rest: post(_rows_dynamic(x), _rows_dynamic(attn, 0, 2), *rest)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._memory: GraphMemory | None = None  # the decode steps' graphs, once the first is captured
        self.prefill_graphs = prefill_graphs and device.type == "cuda"
        self._prefill_graphs: dict[tuple[int, int], _PrefillGraph] = {}
        self._prefill_memory: GraphMemory | None = None  # the prefills' (their own: they run beside the steps)
        # The graphs' static inputs are views into one buffer each (graphs never run at once): rows x max_context
        # embeddings for the most rows seen, and the slots' indices and lengths.
        self._prefill_embeds: torch.Tensor | None = None
        self._prefill_index = torch.zeros(slots, dtype=torch.long, device=device)
        self._prefill_lengths = torch.zeros(slots, dtype=torch.long, device=device)

    @staticmethod
    def bytes_per_slot(model: Any, max_context: int) -> int:
        """KV cache bytes one slot of `max_context` tokens takes."""
        config = model.model.language_model.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        element = model.lm_head.weight.element_size()
        return 2 * int(config.num_hidden_layers) * kv_heads * max_context * head_dim * element

    @torch.no_grad()
    def first_tokens(
        self, slots: torch.Tensor, lengths: torch.Tensor, logits: torch.Tensor, prompts: torch.Tensor, seeds: list[int]
    ) -> torch.Tensor:
        """The prefilled rows' first answer tokens from their last prompt positions' `logits` [rows, vocab], on the
        device; `slots` take the rows' `seeds` and (repetition penalty) their `prompts` [rows, width] (right-padded
        ids) as the ids seen so far. Nothing else of the decoder's state changes: `commit` starts the rows."""
        history = None
        if self.history is not None:
            columns = torch.arange(self.max_context, device=self.device)[None, :]
            width = min(prompts.shape[1], self.max_context)
            padded = torch.nn.functional.pad(prompts[:, :width], (0, self.max_context - width))
            history = torch.where(columns < lengths[:, None], padded, prompts[:, :1])
            self.history.index_copy_(0, slots, history)
        seeds_t = self.device_longs(seeds)
        self.seeds.index_copy_(0, slots, seeds_t)
        return self.selector(logits, history, seeds_t, lengths)

    @torch.no_grad()
    def load(self, slots: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy prefilled K/V ([rows, kv_heads, T, head_dim] per layer, rows right-padded) into `slots`."""
        index = self.device_longs(slots)
        width = keys[0].shape[2]
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            for side, part in enumerate((k, v)):
                target, source = wide(self.kv_cache[layer, side, :, :, :width], part)
                target.index_copy_(0, index, source)

    def device_longs(self, values: list[int]) -> torch.Tensor:
        """A small index tensor on the device, copied without making the host wait for the stream (pinned memory)."""
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @torch.no_grad()
    def prefill(
        self,
        embeds: torch.Tensor,
        width: int,
        slots: list[int],
        lengths: list[int],
        prompts: torch.Tensor,
        seeds: list[int],
    ) -> torch.Tensor:
        """Run the language model over right-padded prompt embeddings [rows * width, hidden] into `slots`.

        The same per-layer functions as the decode step (compiled once for any row count), with causal
        attention over each row; K/V go straight into the slots, and nothing else of the decoder's state changes
        (a prefill may run beside decoding steps): `commit` starts the rows. Returns each row's first token
        (`first_tokens`, from `prompts` [rows, width] and `seeds`), on the device, not yet read back.
        """
        index, lengths_t = self.device_longs(slots), self.device_longs(lengths)
        logits = self._prefill_logits(embeds, width, index, lengths_t)
        return self.first_tokens(index, lengths_t, logits, prompts, seeds)

    @torch.no_grad()
    def commit(self, slots: list[int], lengths: list[int], tokens: list[int]) -> None:
        """Prefilled slots start decoding: their positions (the prompts' lengths) and first tokens."""
        index = self.device_longs(slots)
        self.positions.index_copy_(0, index, self.device_longs(lengths))
        self.tokens.index_copy_(0, index, self.device_longs(tokens))

    def _prefill_logits(
        self, embeds: torch.Tensor, width: int, index: torch.Tensor, lengths_t: torch.Tensor
    ) -> torch.Tensor:
        if not self.prefill_graphs:
            return self._prefill(embeds, width, index, lengths_t)
        key = (len(index), width)
        captured = self._prefill_graphs.get(key)
        if captured is None:
            if len(self._prefill_graphs) >= MAX_PREFILL_GRAPHS:
                return self._prefill(embeds, width, index, lengths_t)
            captured = self._capture_prefill(embeds, width, index, lengths_t)
            if captured is None:
                return self._prefill(embeds, width, index, lengths_t)
        else:
            captured.embeds.copy_(embeds)
            captured.index.copy_(index)
            captured.lengths.copy_(lengths_t)
        captured.graph.replay()
        # A copy: the next replay of this shape overwrites the graph's static output, and the engine queues further
        # prefills before it reads the tokens picked from these back.
        return captured.logits.clone()

    def _capture_prefill(
        self, embeds: torch.Tensor, width: int, index: torch.Tensor, lengths: torch.Tensor
    ) -> _PrefillGraph | None:
        """A graph of this prefill's shape, its static inputs holding this prefill (a replay computes it). The
        warm-up run writes the same K/V a replay will, so nothing needs undoing. A capture
        that fails turns prefill graphs off for the decoder's life, with a warning."""
        rows = len(index)
        if self._prefill_embeds is None or self._prefill_embeds.shape[0] < rows * self.max_context:
            self._prefill_graphs.clear()  # their inputs were views into the smaller buffer
            self._prefill_embeds = torch.empty(
                rows * self.max_context, embeds.shape[-1], dtype=embeds.dtype, device=self.device
            )
        inputs = (self._prefill_embeds[: embeds.shape[0]], self._prefill_index[:rows], self._prefill_lengths[:rows])
        for static, value in zip(inputs, (embeds, index, lengths), strict=True):
            static.copy_(value)
        if self._prefill_memory is None:
            self._prefill_memory = GraphMemory()
        try:
            graph, logits = capture(lambda: self._prefill(inputs[0], width, inputs[1], inputs[2]), self._prefill_memory)
        except RuntimeError as err:  # an operation that cannot be captured, or out of memory
            self.prefill_graphs = False
            self._prefill_graphs.clear()
            log.warning("prefill: CUDA graph capture failed (%s); prefilling eagerly", str(err).splitlines()[0])
            return None
        captured = _PrefillGraph(graph, *inputs, logits)
        self._prefill_graphs[(rows, width)] = captured
        log.debug("captured a prefill of %s x %d tokens", counted(rows, "row"), width)
        return captured

    def _prefill(self, embeds: torch.Tensor, width: int, index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows = len(index)
        positions = torch.arange(width, device=self.device).repeat(rows)
        cos, sin = self.cos[positions], self.sin[positions]
        x = embeds
        normed = self._norm(x, self.norm_in, self.eps)
        for layer_index, layer in enumerate(self.layers):
            q, kv = self._pre(normed, layer.qkv, cos, sin, self.heads, self.kv_heads, self.head_dim)
            q = q.view(rows, width, self.heads, self.head_dim).transpose(1, 2)
            kv = kv.view(rows, width, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [2, rows, KVH, T, hd]
            target, source = wide(self.kv_cache[layer_index, :, :, :, :width], kv)
            target.index_copy_(1, index, source)
            k, v = kv
            if self.kv_heads != self.heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
                v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            x, normed = self._post(
                x, attn, layer.o, layer.norm_post, layer.gate_up, layer.down, layer.norm_next, self.eps
            )
        last = lengths - 1 + torch.arange(rows, device=self.device) * width
        return F.linear(normed[last], self.lm_head)  # the last prompt positions' logits

    @torch.no_grad()
    def set_active(self, active: list[bool]) -> None:
        """Which slots decode. An idle slot's position moves to the last cache column: its (ignored) step writes K/V
        there, a column no prompt reaches (a prompt leaves room for its answer), so a prefill into the slot running
        beside the steps is never overwritten; the slot's first step once it decodes rewrites that column before
        reading it."""
        flags = self.device_longs([int(flag) for flag in active])
        self.active.copy_(flags)
        self.positions.copy_(torch.where(self.active.bool(), self.positions, self.max_context - 1))

    @torch.no_grad()
    def step(self, rows: int, columns: int) -> None:
        """The next token for slots [0, rows), attending to cache columns [0, columns)."""
        if not self.cuda_graphs:
            self._step(rows, columns)
            return
        graph = self._graphs.get((rows, columns))
        if graph is None:
            graph = self._capture(rows, columns)
        graph.replay()

    def _capture(self, rows: int, columns: int) -> torch.cuda.CUDAGraph:
        # The warm-up run writes the same K/V the real step will; tokens and positions are restored after it.
        saved = self.tokens.clone(), self.positions.clone()

        def restore() -> None:
            self.tokens.copy_(saved[0])
            self.positions.copy_(saved[1])

        if self._memory is None:
            self._memory = GraphMemory()
        graph, _ = capture(lambda: self._step(rows, columns), self._memory, after_warmup=restore)
        self._graphs[(rows, columns)] = graph
        log.debug("captured a decode step for %s x %d columns", counted(rows, "row"), columns)
        return graph

    def _step(self, rows: int, columns: int) -> None:
        tokens, positions = self.tokens[:rows], self.positions[:rows]
        index = self.rows[:rows]
        history = None
        if self.history is not None:
            # The fed-back token joins the ids its row has seen; an idle slot (a prefill may be filling it) writes its
            # first id again at its parked position, which keeps its history as it was.
            history = self.history[:rows]
            seen = torch.where(self.active[:rows].bool(), tokens, history[:, 0])
            history[index, positions] = seen
        x = F.embedding(tokens, self.embed)
        normed = self._norm(x, self.norm_in, self.eps)
        cos, sin = self.cos[positions], self.sin[positions]
        visible = self.columns[:columns][None, :] <= positions[:, None]
        mask = additive_mask(visible, x.dtype)[:, None, None, :]  # once a step, not once a layer
        for layer_index, layer in enumerate(self.layers):
            q, kv = self._pre(normed, layer.qkv, cos, sin, self.heads, self.kv_heads, self.head_dim)
            cache = self.kv_cache[layer_index]
            target, source = wide(cache, kv)
            target[:, index, :, positions] = source
            attn = self._attend(q, cache[0, :rows, :, :columns], cache[1, :rows, :, :columns], mask)
            x, normed = self._post(
                x, attn, layer.o, layer.norm_post, layer.gate_up, layer.down, layer.norm_next, self.eps
            )
        logits = F.linear(normed, self.lm_head)
        self.tokens[:rows].copy_(self.selector(logits, history, self.seeds[:rows], positions + 1))
        self.positions[:rows].add_(self.active[:rows])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of one query per row over the row's cache columns (`mask` additive, [rows, 1, 1, columns]);
        returns [rows, heads, 1, head_dim]."""
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        q = q.unsqueeze(2)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            # Adding 0 leaves a score as it is and -inf masks it: what masked_fill would give.
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + mask
            out = torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)
        return out
