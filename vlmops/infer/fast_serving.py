"""The loop of a FastEngine `generate` call (vlmops.infer.fast_engine): waiting prompts prefilled into free slots,
decoding steps for the rows in them, finished rows answered and their slots refilled.

Prefills are queued back to back: while slots are free and prompts wait, the next prefill is launched before the
earlier ones' first tokens are read back, so the GPU runs one while the host builds the next; their rows join the
decoding batch, oldest first, before the next step. With `overlap_prefill` instead, one prefill at a time runs on a
CUDA stream of its own while the rows already in their slots go on decoding; it writes only its slots' K/V (an idle
slot's step writes the slot's last column, which no prompt reaches), and its rows' positions and first tokens are set
on the decoding stream when they join.

Decoding steps are launched `decode_window` at a time and their tokens read back once per window. With `lookahead`
(the default) the next window is launched before the last one's tokens are read back: the GPU works through the
host's read and bookkeeping, and a finished row is seen (and its slot freed) one window later. A step covers slots
[0, rows) and cache columns [0, columns), both rounded up to buckets, so short contexts and a part-empty batch cost
less; each (rows, columns) bucket is captured once.

The functions take the engine: they read its settings, drive its decoder and streams, and add to its `stats`. What
they hand each other: a slot's `Row`, a `Window` of decoding steps launched and not yet read, a `_Pending` prefill.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlmops.infer.engine import GenerationResult
from vlmops.infer.fast_requests import Prepared

if TYPE_CHECKING:
    from vlmops.infer.fast_engine import FastEngine


@dataclass
class Row:
    """A request decoding in a slot: its key, its prompt's length and the tokens generated so far."""

    key: Any
    prompt_length: int
    tokens: list[int] = field(default_factory=list)
    ahead: int = 0  # decode steps launched for the row whose tokens are not read yet


@dataclass
class Window:
    """Decode steps launched and not yet read: the rows they stepped (slot, row) and their tokens [steps, rows],
    on the device or being copied to pinned host memory until `done`."""

    rows: list[tuple[int, Row]]
    tokens: torch.Tensor
    done: torch.cuda.Event | None

    def read(self) -> list[list[int]]:
        """The tokens, each step a list over the slots: waits for the GPU."""
        if self.done is not None:
            self.done.synchronize()
        return self.tokens.tolist()


@dataclass
class _Pending:
    """A prefill launched and not yet joined: its prompts, their slots, the first tokens (on the device) and, when
    it runs on its own stream, the event that marks it done. Its rows start decoding when it is joined."""

    group: list[Prepared]
    slots: list[int]
    lengths: list[int]
    tokens: torch.Tensor
    done: torch.cuda.Event | None = None
    waited: bool = False  # a decoding window ran since the launch

    def ready(self) -> bool:
        """Done on the GPU; without a stream of its own (CPU), after one decoding window: the order in which an
        overlapped prefill's rows join on a GPU, so that CPU tests run the same interleaving."""
        return bool(self.done.query()) if self.done is not None else self.waited


def serve(
    engine: FastEngine, waiting: Iterator[Prepared], free: list[int], rows: dict[int, Row]
) -> Iterator[GenerationResult]:
    """Prefill waiting prompts into free slots and decode the rows until both run out."""
    exhausted = False
    # Prefills launched and not yet joined, oldest first. Beside decoding (`overlap_prefill`): at most one, joined
    # once done. Otherwise as many as the free slots take, queued back to back on one stream and joined before the
    # next decoding step: a join reads the first tokens back (the first join waits for all the queued prefills), so
    # joining each prefill before launching the next left the GPU idle while the host built the next.
    pending: list[_Pending] = []
    while True:
        if engine.overlap_prefill and pending and (not rows or pending[0].ready()):
            yield from _join(engine, [pending.pop(0)], rows, free)
        may_launch = not exhausted and not (engine.overlap_prefill and pending)
        # min_refill spares decoding rows a prefill for a few slots; with none decoding yet, fill every slot (a
        # first prefill of `first_prefill` otherwise left the last few empty until the rows finished).
        if may_launch and len(free) >= (engine.min_refill if rows else 1):
            size = engine.prefill_batch if rows or pending else engine.first_prefill  # the GPU idle: start it
            group = list(itertools.islice(waiting, min(len(free), size)))
            exhausted = not group
            if group:
                slots = [heapq.heappop(free) for _ in group]
                pending.append(_launch(engine, group, slots))
                continue
        if pending and not engine.overlap_prefill:
            joined, pending = pending, []
            yield from _join(engine, joined, rows, free)
            continue  # rows that stopped at their first token freed slots: refill them before decoding
        if not rows:
            if exhausted and not pending:
                return
            continue
        yield from _decode(engine, rows, free)
        for launched in pending:
            launched.waited = True


def _decoding(engine: FastEngine) -> contextlib.AbstractContextManager[Any]:
    """Where the decoding rows' GPU work runs: the decode stream beside overlapped prefills, else the current
    stream. Entered around each piece of work, never across a `yield`."""
    return torch.cuda.stream(engine.decode_stream) if engine.decode_stream is not None else contextlib.nullcontext()


def _launch(engine: FastEngine, group: list[Prepared], slots: list[int]) -> _Pending:
    """Start prefilling `group` into `slots`: on the prefill stream (after what the decoding stream has queued:
    the slots' last steps) when prefills overlap decoding, else where the engine runs."""
    start = time.perf_counter()
    if engine.stats.first_prefill_s is None:
        engine.stats.first_prefill_s = start - engine._started
    if engine.prefill_stream is None:
        pending = _prefill(engine, group, slots)
    else:
        engine.prefill_stream.wait_stream(engine.decode_stream or torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(engine.prefill_stream):
            pending = _prefill(engine, group, slots)
            pending.done = torch.cuda.Event()
            pending.done.record(engine.prefill_stream)
    engine.stats.prefill_s += time.perf_counter() - start
    return pending


def _join(
    engine: FastEngine, pendings: list[_Pending], rows: dict[int, Row], free: list[int]
) -> Iterator[GenerationResult]:
    """The prefilled rows start decoding; a row whose first token already ends it is answered and freed.

    The prefills queued back to back are joined together: one read of their first tokens, one commit and one
    change of the active slots (joined one by one, the host's work for each of a call's 48 prefills of 768
    prompts kept the GPU idle before the first decoding step: 37.6 ms in that tenth of the call against 13.7
    joined together; bench/RESULTS.md session 25)."""
    start = time.perf_counter()
    for pending in pendings:
        if pending.done is not None:
            pending.done.synchronize()
    group = [item for pending in pendings for item in pending.group]
    slots = [slot for pending in pendings for slot in pending.slots]
    with _decoding(engine):
        tokens = torch.cat([pending.tokens for pending in pendings]) if len(pendings) > 1 else pendings[0].tokens
        first = [int(t) for t in tokens.tolist()]
        engine.decoder.commit(slots, [length for pending in pendings for length in pending.lengths], first)
    engine.stats.prefill_s += time.perf_counter() - start
    engine.stats.prefill_calls += len(pendings)
    engine.stats.prompts += len(group)
    yield from _admit(engine, group, slots, first, rows, free)


def _admit(
    engine: FastEngine, group: list[Prepared], slots: list[int], first: list[int], rows: dict[int, Row], free: list[int]
) -> Iterator[GenerationResult]:
    """Rows for `group` in `slots`, from their first tokens; a row whose first token already ends it is answered
    and freed."""
    for item, slot, token in zip(group, slots, first, strict=True):
        row = Row(item.request.key, len(item.request.prompt_ids))
        rows[slot] = row
        result = _advance(engine, row, token)
        if result is not None:
            del rows[slot]
            heapq.heappush(free, slot)
            yield result
    with _decoding(engine):
        engine.decoder.set_active([slot in rows for slot in range(engine.slots)])


@torch.no_grad()
def _prefill(engine: FastEngine, group: list[Prepared], slots: list[int]) -> _Pending:
    """Run the VLM over `group` (right-padded), each row's K/V into its slot; the first tokens, not yet read back.
    Nothing here makes the host wait for the GPU, so decoding steps can be queued while it runs."""
    lengths = [len(item.request.prompt_ids) for item in group]
    width = min(engine.max_context, -(-max(lengths) // engine.width_bucket) * engine.width_bucket)
    input_ids = torch.full(
        (len(group), width), engine.pad_id, dtype=torch.long, pin_memory=engine.device.type == "cuda"
    )
    for row, item in enumerate(group):
        input_ids[row, : lengths[row]] = torch.tensor(item.request.prompt_ids, dtype=torch.long)
    prompts = input_ids.to(engine.device, non_blocking=True)
    seeds = [item.request.seed for item in group]
    inputs: dict[str, torch.Tensor] = {"input_ids": prompts}
    for name in {name for item in group for name in item.pixels}:
        inputs[name] = _stacked(engine, [item.pixels[name] for item in group if name in item.pixels])
        if engine.device_pixels is not None:
            inputs[name] = engine.device_pixels.values(name, inputs[name]).to(engine.dtype)
    if engine.prefill_mode == "own":
        # Flat [rows * width, hidden]: the layer functions see one token per row, as in decode.
        embeds = engine.model.get_input_embeddings()(inputs.pop("input_ids").view(-1))
        if inputs:
            features = engine.vision(inputs)
            # The image tokens' rows, found on the host (masked_scatter would count them on the device: a wait)
            image_rows = engine.decoder.device_longs(
                (input_ids.view(-1) == engine.image_token_id).nonzero()[:, 0].tolist()
            )
            embeds = embeds.index_copy(0, image_rows, features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        return _Pending(group, slots, lengths, engine.decoder.prefill(embeds, width, slots, lengths, prompts, seeds))
    output = engine.model.model(**inputs, use_cache=True)
    lengths_t = torch.tensor(lengths, device=engine.device)
    hidden = output.last_hidden_state[torch.arange(len(group), device=engine.device), lengths_t - 1]
    logits = engine.model.lm_head(hidden)
    tokens = engine.decoder.first_tokens(engine.decoder.device_longs(slots), lengths_t, logits, prompts, seeds)
    keys, values = _cache_tensors(output.past_key_values)
    engine.decoder.load(slots, keys, values)
    return _Pending(group, slots, lengths, tokens)


def _stacked(engine: FastEngine, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The images' pixel tensors, concatenated on the device. On CUDA each pinned piece is copied into its rows:
    no host copy (a concatenation on the host is pageable memory, whose copy makes the host wait for the stream)."""
    if engine.device.type != "cuda":
        return torch.cat(tensors)
    stacked = torch.empty(
        (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=engine.device
    )
    start = 0
    for tensor in tensors:
        stacked[start : start + tensor.shape[0]].copy_(tensor, non_blocking=True)
        start += tensor.shape[0]
    return stacked


def _decode(engine: FastEngine, rows: dict[int, Row], free: list[int]) -> Iterator[GenerationResult]:
    """Up to `decode_window` steps for every decoding row, then one read of their tokens (with `lookahead`, of the
    window launched before these steps); finished rows are answered and their slots freed."""
    start = time.perf_counter()
    launched = _launch_window(engine, rows)
    if engine.lookahead:
        launched, engine._in_flight = engine._in_flight, launched
    steps = launched.read() if launched is not None else []  # the one wait for the GPU
    engine.stats.decode_s += time.perf_counter() - start
    if launched is None:  # lookahead: nothing was in flight yet
        return
    finished: dict[int, GenerationResult] = {}
    for slot, row in launched.rows:
        row.ahead -= len(steps)
        if rows.get(slot) is not row:  # stopped in a window read before (its slot may hold a new row now)
            continue
        for tokens in steps:
            result = _advance(engine, row, int(tokens[slot]))
            if result is not None:
                finished[slot] = result
                break
    for slot in finished:
        del rows[slot]
        heapq.heappush(free, slot)
    if finished:
        with _decoding(engine):
            engine.decoder.set_active([slot in rows for slot in range(engine.slots)])
    yield from finished.values()


def _launch_window(engine: FastEngine, rows: dict[int, Row]) -> Window | None:
    """Launch up to `decode_window` steps for every decoding row, their tokens copied back without a wait; None
    (lookahead only) when a row's slot has no room for another step, or no row needs one, before the window in
    flight is read."""
    span = max(rows) + 1
    step_rows = next(b for b in engine.row_buckets if b >= span)
    # A row's step writes its newest token's K/V at position (prompt + tokens so far - 1): the window stays
    # within every row's slot, and the columns cover the positions its last step attends to. Steps launched and
    # not read yet count: a row that stopped in them is not known to have stopped.
    filled = max(row.prompt_length + len(row.tokens) + row.ahead for row in rows.values())
    # No more steps than the row furthest from max_new_tokens needs: past that every token is dropped (with
    # lookahead, once every row's window in flight brings it to max_new_tokens, nothing more is launched).
    needed = max(engine.max_new_tokens - len(row.tokens) - row.ahead for row in rows.values())
    window = min(engine.decode_window, engine.max_context - filled + 1, needed)
    if window < 1:
        return None
    longest = filled + window - 1
    columns = min(engine.max_context, -(-longest // engine.column_bucket) * engine.column_bucket)
    launched = []
    with _decoding(engine):
        for index in range(window):
            engine.decoder.step(step_rows, columns)
            tokens = engine.decoder.tokens[:step_rows]
            launched.append(tokens if index == window - 1 and not engine.lookahead else tokens.clone())
        stacked = torch.stack(launched) if window > 1 else launched[0][None]
        done = None
        if engine.device.type == "cuda":
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            stacked = host.copy_(stacked, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
    engine.stats.decode_steps += window
    for row in rows.values():
        row.ahead += window
    return Window(list(rows.items()), stacked, done)


def _advance(engine: FastEngine, row: Row, token: int) -> GenerationResult | None:
    """Take one generated token; the row's result once it stops."""
    if engine.eos_id is not None and token == engine.eos_id:
        return GenerationResult(row.key, row.tokens, "stop")
    row.tokens.append(token)
    engine.stats.generated_tokens += 1
    if len(row.tokens) >= engine.max_new_tokens:
        return GenerationResult(row.key, row.tokens, "length")
    return None


def _cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V ([batch, kv_heads, tokens, head_dim]) of a transformers DynamicCache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [layer.keys for layer in layers], [layer.values for layer in layers]
    return list(cache.key_cache), list(cache.value_cache)
