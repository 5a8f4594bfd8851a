"""FastEngine: DeepSeek-VL generation with batched prefill, a static KV cache and continuous batching.

How a request travels:

1. Worker threads run the image processor on each request's images ahead of the GPU (`image_workers`,
   a bounded look-ahead, so requests are still pulled lazily): its resize and padding, to uint8; the
   rescale and normalise happen on the device as a table lookup (vlmops.models.pixels).
2. Prefill: waiting prompts fill the free slots, up to `prefill_batch` at a time, through the VLM's own
   forward (vision towers, features scattered into the image-token positions, the whole LLM) on a
   right-padded batch: a row's real tokens never see the padding after them, so no mask is needed and
   each row's K/V for positions [0, length) land in its slot of the static cache unchanged. Prefills are queued
   back to back: while slots are free and prompts wait, the next prefill is launched before the earlier ones' first
   tokens are read back, so the GPU runs one while the host builds the next; their rows join the decoding batch,
   oldest first, before the next step. With `overlap_prefill` instead, one prefill at a time runs on a CUDA stream
   of its own while the rows already in their slots go on decoding; it writes only its slots' K/V (an idle slot's
   step writes the slot's last column, which no prompt reaches), and its rows' positions and first tokens are set on
   the decoding stream when they join.
3. Decode: `StaticDecoder` (vlmops.infer.fast_decode) makes one token for every slot per step from
   the static cache, each step a CUDA graph replay on CUDA. A finished row (EOS or `max_new_tokens`)
   yields its result at once and its slot is refilled by waiting prompts (once at least `min_refill`
   slots are free, so prefill runs in batches rather than one prompt at a time). With `lookahead` (the default) the
   next step is launched before the last one's tokens are read back: the GPU works through the host's read and
   bookkeeping, and a finished row is seen (and its slot freed) one step later.

A step covers slots [0, rows) and cache columns [0, columns), both rounded up to buckets, so short
contexts and a part-empty batch cost less; each (rows, columns) bucket is captured once.

Tokens are picked as `generate` picks them for the same `infer.*` (vlmops.infer.sampling: transformers' own logits
processors for the repetition penalty, temperature, top-k and top-p): greedy answers equal `model.generate`'s token
for token in float32 (tests/infer/test_fast_engine.py), in bf16 the different kernel choices change rounding
(measured by bench/infer_bench.py); sampled ones draw each request's tokens from its own seed, so a request gets the
same answer whatever else shares its batch.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmops.config import InferConfig
from vlmops.errors import UserInputError
from vlmops.infer.engine import GenerationRequest, GenerationResult, refuse_context_without_room
from vlmops.infer.fast_decode import StaticDecoder
from vlmops.infer.fast_memory import GIB, fit_slots, slot_pick_bytes
from vlmops.infer.fast_requests import Prepared, prepared_requests
from vlmops.infer.generation import model_dtype
from vlmops.infer.prefetch import HOST_THREADS
from vlmops.infer.sampling import TokenSelector
from vlmops.models.compile_cache import describe_compile_cache
from vlmops.models.loading import LoadedModel
from vlmops.models.pixels import DevicePixels
from vlmops.models.sam_attention import SAM_ATTENTION, set_sam_attention, set_sam_compiled
from vlmops.models.tower_compile import set_siglip_compiled
from vlmops.models.vision_graphs import VisionGraphs, image_features, memoise_rel_pos
from vlmops.plural import counted

log = logging.getLogger(__name__)

# Below this many free slots (and while other rows still decode) prefill waits for more to free up.
MIN_REFILL_SHARE = 8
# With prefill graphs, prompt batches are right-padded to a multiple of this many tokens (at most ~5% more prefill
# work on ~600-token prompts), so that a few graphs serve every batch.
PREFILL_WIDTH_BUCKET = 32


@dataclass
class EngineStats:
    """Where the last `generate` call spent its time (host clock; both phases end in a GPU sync). `prefill_s` is the
    host's time launching prefills and waiting for them: with prefills queued back to back, the GPU time of one falls
    partly in the launch of the next. With `overlap_prefill`, the GPU time of a prefill that ran beside decoding steps
    falls inside `decode_s`. `image_wait_s`: the host's time waiting for the image threads' preprocessing (the GPU
    idles through it when nothing is queued); `first_prefill_s`: from the call's start to its first prefill's launch."""

    prompts: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    prefill_calls: int = 0
    image_wait_s: float = 0.0
    first_prefill_s: float | None = None


@dataclass
class _Row:
    key: Any
    prompt_length: int
    tokens: list[int] = field(default_factory=list)
    ahead: int = 0  # decode steps launched for the row whose tokens are not read yet


@dataclass
class _Window:
    """Decode steps launched and not yet read: the rows they stepped (slot, row) and their tokens [steps, rows],
    on the device or being copied to pinned host memory until `done`."""

    rows: list[tuple[int, _Row]]
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


class FastEngine:
    """Generation for DeepSeek-VL (1.3b and the 7b hybrid) on CUDA, and on CPU for tests: greedy or sampled.

    Building one rebinds the language model's q/k/v and gate/up weights to views of fused tensors (values
    unchanged, no extra memory) and allocates the KV cache for `max_batch` slots. One `generate` call at a
    time per engine: the slots are the engine's state.

    Tuning:
        max_batch: decoding slots (rows per step); lowered to fit `memory_gib`.
        max_context: prompt + answer tokens a slot holds; longer requests are refused.
        prefill_batch: prompts per prefill forward.
        first_prefill: prompts in a prefill launched while the GPU has nothing else queued (a call's first; default
            `image_workers`, at most `prefill_batch`). The image threads finish their first images together, one
            per thread: the GPU starts on those rather than waiting for a second round to fill a whole prefill
            batch (on an H200, 1.3b at batch 32: 8,221 generated tokens/s against 8,072 with a first prefill of 16
            in the same run; session 22, bench/RESULTS.md).
        min_refill: free slots that trigger a prefill while other rows decode (default max_batch / 8, at
            most prefill_batch). Before any row decodes, every free slot is filled.
        memory_gib: cap on the GPU memory the model, the cache and prefill may take together (None: 90% of the card).
        cuda_graphs: capture decode steps (default: on CUDA).
        compile: torch.compile the per-layer arithmetic of the step (default: on CUDA). Its matmuls stay cuBLAS's:
            inductor's max-autotune for them measured slower on an H200 in session 19 and was taken out
            (bench/RESULTS.md).
        attention: "sdpa" or "matmul" for the decode step's attention (FlexAttention's decoding kernel measured
            slower on an H200 in session 11 and was taken out: bench/RESULTS.md).
        prefill: "own" runs the vision towers through transformers, then the language model with the
            decode step's (compiled) layer functions, K/V written straight into the slots; "model" runs
            the VLM's own forward and copies K/V out of its cache.
        image_workers: threads preprocessing images ahead of the GPU (default: up to 8, one per core).
        device_pixels: hand the device uint8 pixels and rescale/normalise them there (vlmops.models.pixels),
            where that reproduces the processor exactly; False: the processor's float output, as generate gets.
        ignore_eos: never produce EOS (its logit masked, as generate's min_new_tokens does): every answer
            runs to max_new_tokens. For benchmarks.
        decode_window: decode steps launched before the host reads their tokens back (1: read after every
            step). Reading back waits for the GPU, so between two reads it idles while the host does its
            bookkeeping; with a window of k the GPU has k steps queued. A row that stops inside a window keeps
            its slot (decoding tokens that are dropped) until the window ends.
        lookahead: launch each decoding window before reading the one before it back, so the GPU has the next steps
            queued while the host waits for the last ones' tokens and does its bookkeeping (the idle gap between
            steps). A row that stops is seen one window later: its slot runs one more window of dropped tokens and is
            refilled that much later. Answers are the same either way.
        vision_graphs: run the vision towers of each prefill batch from CUDA graphs, one per image count
            (vlmops.models.vision_graphs; default: on CUDA); False: eagerly.
        prefill_graphs: with prefill "own", run the language model's half of each prefill from a CUDA graph, one
            per (prompts, width) with widths padded up to a multiple of `PREFILL_WIDTH_BUCKET` (the padding on any
            device, the graphs on CUDA).
        sam_attention: the 7b's SAM attention on CUDA (vlmops.models.sam_attention): "folded", its relative positions
            folded into the query and key (no dense bias); "flex", the bias inside a compiled FlexAttention kernel;
            "sdpa": transformers' own.
        sam_compile: with `sam_attention` "folded" on CUDA, the 7b's SAM tower through torch.compile (compiled at the
            first prefill, before its graph is captured).
        siglip_compile: on CUDA, the SigLIP tower through torch.compile (vlmops.models.tower_compile), as SAM's
            (compiled at the first prefill, before its graph is captured).
        overlap_prefill: on CUDA with prefill "own", run each prefill on a stream of its own while the rows already
            in their slots go on decoding, on a high-priority stream (compute-bound prefill beside bandwidth-bound
            decode steps); the prompts join the decoding batch when their prefill is done. The same answers either
            way. Measured slower on an H200 (sessions 12 and 16), also with cuBLAS told to leave SMs to decoding.
        switch_interval: Python's thread switch interval (`sys.setswitchinterval`, seconds) while `generate` runs,
            restored after it (None: left as it is, 5 ms by default). The image threads hold the GIL in turns with the
            thread that launches the GPU's work: a shorter interval hands it back to that thread sooner. Measured on
            an H200 (1.3b, batch 32, median of 5 calls, bench/RESULTS.md session 17): 0.5 ms gave +1.2% with prefills
            of 16 and +2.7% with prefills of 8; within one call's noise in bench/infer_bench.py, so not the default;
            nothing with PIL's image processor (session 18).
        row_buckets, column_bucket: a decode step covers the slots up to the next row bucket and the cache columns up
            to the next multiple of `column_bucket`; each (rows, columns) pair is one graph. A smaller column bucket
            reads fewer columns past the rows' lengths (the step's attention reads every covered column) for more
            graphs. 32 measured on an H200 (bench/RESULTS.md session 19) against 128: +2.8% at batch 256 (1.3b),
            +1.8% at 128 (7b), the same at 32.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        infer_cfg: InferConfig,
        *,
        max_batch: int = 64,
        max_context: int = 2048,
        prefill_batch: int = 16,
        first_prefill: int | None = None,
        min_refill: int | None = None,
        memory_gib: float | None = None,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        attention: str = "sdpa",
        prefill: str = "own",
        image_workers: int | None = None,
        device_pixels: bool = True,
        ignore_eos: bool = False,
        row_buckets: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512),
        column_bucket: int = 32,
        decode_window: int = 1,
        lookahead: bool = True,
        vision_graphs: bool = True,
        prefill_graphs: bool = True,
        sam_attention: str = "folded",
        sam_compile: bool = True,
        siglip_compile: bool = True,
        overlap_prefill: bool = False,
        switch_interval: float | None = None,
    ) -> None:
        if max_batch < 1 or prefill_batch < 1 or max_context < 2 or decode_window < 1 or column_bucket < 1:
            raise UserInputError(
                "max_batch, prefill_batch, decode_window and column_bucket must be at least 1 and max_context at least 2"
            )
        refuse_context_without_room(max_context, infer_cfg.max_new_tokens)
        if first_prefill is not None and first_prefill < 1:
            raise UserInputError(f"first_prefill={first_prefill}: use at least 1 (or None: prefill_batch)")
        if switch_interval is not None and switch_interval <= 0:
            raise UserInputError(f"switch_interval={switch_interval}: use a positive number of seconds or None")
        self.switch_interval = switch_interval
        self.decode_window = decode_window
        self.lookahead = lookahead
        self._in_flight: _Window | None = None  # with lookahead, the window launched and not read yet
        self.loaded = loaded
        self.model = loaded.model
        # A peft wrapper passes lm_head and model through to the model it wraps: its class tells it apart.
        wrapped = type(self.model).__module__.startswith("peft.")
        if wrapped or not hasattr(self.model, "lm_head") or not hasattr(self.model, "model"):
            raise UserInputError(
                f"FastEngine needs a DeepSeek-VL model with merged weights, got {type(self.model).__name__}; "
                "merge a LoRA adapter first (vlmops.infer.engine.merge_adapter: peft's merge_and_unload) or use the "
                "plain engine"
            )
        if prefill not in ("own", "model"):
            raise UserInputError(f"prefill={prefill!r}: use own or model")
        self.prefill_mode = prefill
        self.max_new_tokens = infer_cfg.max_new_tokens
        self.max_context = max_context
        self.prefill_batch = prefill_batch
        self.image_workers = max(1, image_workers or HOST_THREADS)
        self.first_prefill = min(prefill_batch, first_prefill or self.image_workers)
        self.device_pixels = DevicePixels.build(loaded.processor.image_processor) if device_pixels else None
        tokenizer = loaded.tokenizer
        self.eos_id: int | None = None if ignore_eos else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.image_token_id = int(self.model.config.image_token_id)
        self.num_image_tokens = loaded.num_image_tokens
        self.dtype = model_dtype(loaded)
        self.device = loaded.device
        on_cuda = self.device.type == "cuda"
        prefill_graphs = prefill_graphs and prefill == "own"  # the VLM's own forward is not captured
        compile_step = on_cuda if compile is None else compile
        selector = TokenSelector(
            infer_cfg, suppress_token=tokenizer.eos_token_id if ignore_eos else None, compile=compile_step
        )
        pick_bytes = slot_pick_bytes(selector, self.model, max_context)
        slots = fit_slots(
            self.model,
            self.device,
            self.dtype,
            self.max_context,
            self.prefill_batch,
            max_batch,
            memory_gib,
            prefill_graphs,
            pick_bytes,
        )
        log.info(
            "FastEngine: %s of %d tokens (K/V cache %.1f GiB)",
            counted(slots, "slot"),
            max_context,
            slots * StaticDecoder.bytes_per_slot(self.model, max_context) / GIB,
        )
        if not selector.plain_greedy:
            log.info("FastEngine: tokens %s", selector.describe())
        self.decoder = StaticDecoder(
            self.model,
            slots=slots,
            max_context=max_context,
            cuda_graphs=on_cuda if cuda_graphs is None else cuda_graphs,
            compile_step=compile_step,
            attention=attention,
            selector=selector,
            prefill_graphs=prefill_graphs,
        )
        # Graphs are keyed by width: a few buckets rather than every prompt length. The padding is right-padding,
        # which a row's real tokens never see under causal attention.
        self.width_bucket = PREFILL_WIDTH_BUCKET if prefill_graphs else 1
        self.slots = slots
        # Never more than a prefill batch: otherwise the last few free slots of a wave would stay empty.
        default_refill = min(prefill_batch, max(1, slots // MIN_REFILL_SHARE))
        self.min_refill = max(1, min_refill if min_refill is not None else default_refill)
        # Prefills beside decoding (own prefill only): on a stream of their own on CUDA.
        self.overlap_prefill = overlap_prefill and prefill == "own"
        self.prefill_stream = torch.cuda.Stream(self.device) if self.overlap_prefill and on_cuda else None
        # ...and the decoding rows' work then on a high-priority stream: the GPU dispatches a step's small kernels
        # ahead of a prefill's queued ones, so decoding does not wait behind whole prefill matmuls.
        self.decode_stream = torch.cuda.Stream(self.device, priority=-1) if self.prefill_stream is not None else None
        self.row_buckets = sorted({b for b in row_buckets if b < slots} | {slots})
        self.column_bucket = column_bucket
        self.stats = EngineStats()
        self._started = 0.0  # the perf_counter of the current call's start
        if sam_attention not in SAM_ATTENTION:
            raise UserInputError(f"sam_attention={sam_attention!r}: use {', '.join(SAM_ATTENTION)}")
        # Set on every engine: an earlier one over the same model may have changed it. Off CUDA, transformers' own.
        set_sam_attention(self.model, sam_attention if on_cuda else "sdpa")
        towers = set_sam_compiled(self.model, on_cuda and sam_compile and sam_attention == "folded")
        towers += set_siglip_compiled(self.model, on_cuda and siglip_compile)
        # The first call compiles (and captures graphs) before its first answers: say so, or a job's bar sits at 0 for
        # a minute with nothing to tell a stall from work.
        self._compiles_first = compile_step or towers > 0
        if on_cuda and vision_graphs:
            memoise_rel_pos(self.model)  # SAM's tables, computed outside the capture
        # Not a closure over self: a cycle would keep a dropped engine (its K/V cache, most of the GPU) until the
        # collector's next full pass, and the next engine would size itself to what that left free.
        vlm = self.model.model
        self.vision = VisionGraphs(lambda pixels: image_features(vlm, pixels), on_cuda and vision_graphs)

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        """One result per request, finished rows first; pulls `requests` a bounded look-ahead at a time."""
        self.stats = EngineStats()
        self._started = time.perf_counter()
        self._in_flight = None
        if self._compiles_first:
            self._compiles_first = False
            log.info(
                "the first prompts compile the engine's towers and decode step (torch.compile, cache %s) and capture "
                "its CUDA graphs: a minute or more with an empty cache (model.compile_cache keeps it for the next job)",
                describe_compile_cache(),
            )
        with (
            self._switch_interval(),
            ThreadPoolExecutor(self.image_workers, thread_name_prefix="fast-engine-images") as pool,
        ):
            waiting = prepared_requests(self, requests, pool)
            free = list(range(self.slots))
            rows: dict[int, _Row] = {}
            if self.decode_stream is None or self.prefill_stream is None:
                yield from self._serve(waiting, free, rows)
                return
            current = torch.cuda.current_stream(self.device)
            self.decode_stream.wait_stream(current)  # after what was queued before (the weights, the cache)
            try:
                yield from self._serve(waiting, free, rows)
            finally:  # what comes after (a new engine reusing the cache's memory) waits for both streams' work
                current.wait_stream(self.decode_stream)
                current.wait_stream(self.prefill_stream)

    @contextlib.contextmanager
    def _switch_interval(self) -> Iterator[None]:
        if self.switch_interval is None:
            yield
            return
        previous = sys.getswitchinterval()
        sys.setswitchinterval(self.switch_interval)
        try:
            yield
        finally:
            sys.setswitchinterval(previous)

    def _serve(self, waiting: Iterator[Prepared], free: list[int], rows: dict[int, _Row]) -> Iterator[GenerationResult]:
        """Prefill waiting prompts into free slots and decode the rows until both run out."""
        exhausted = False
        # Prefills launched and not yet joined, oldest first. Beside decoding (`overlap_prefill`): at most one, joined
        # once done. Otherwise as many as the free slots take, queued back to back on one stream and joined before the
        # next decoding step: a join reads the first tokens back (the first join waits for all the queued prefills), so
        # joining each prefill before launching the next left the GPU idle while the host built the next.
        pending: list[_Pending] = []
        while True:
            if self.overlap_prefill and pending and (not rows or pending[0].ready()):
                yield from self._join([pending.pop(0)], rows, free)
            may_launch = not exhausted and not (self.overlap_prefill and pending)
            # min_refill spares decoding rows a prefill for a few slots; with none decoding yet, fill every slot (a
            # first prefill of `first_prefill` otherwise left the last few empty until the rows finished).
            if may_launch and len(free) >= (self.min_refill if rows else 1):
                size = self.prefill_batch if rows or pending else self.first_prefill  # the GPU idle: start it
                group = list(itertools.islice(waiting, min(len(free), size)))
                exhausted = not group
                if group:
                    slots = [heapq.heappop(free) for _ in group]
                    pending.append(self._launch(group, slots))
                    continue
            if pending and not self.overlap_prefill:
                joined, pending = pending, []
                yield from self._join(joined, rows, free)
                continue  # rows that stopped at their first token freed slots: refill them before decoding
            if not rows:
                if exhausted and not pending:
                    return
                continue
            yield from self._decode(rows, free)
            for launched in pending:
                launched.waited = True

    def _decoding(self) -> contextlib.AbstractContextManager[Any]:
        """Where the decoding rows' GPU work runs: the decode stream beside overlapped prefills, else the current
        stream. Entered around each piece of work, never across a `yield`."""
        return torch.cuda.stream(self.decode_stream) if self.decode_stream is not None else contextlib.nullcontext()

    def _launch(self, group: list[Prepared], slots: list[int]) -> _Pending:
        """Start prefilling `group` into `slots`: on the prefill stream (after what the decoding stream has queued:
        the slots' last steps) when prefills overlap decoding, else where the engine runs."""
        start = time.perf_counter()
        if self.stats.first_prefill_s is None:
            self.stats.first_prefill_s = start - self._started
        if self.prefill_stream is None:
            pending = self._prefill(group, slots)
        else:
            self.prefill_stream.wait_stream(self.decode_stream or torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.prefill_stream):
                pending = self._prefill(group, slots)
                pending.done = torch.cuda.Event()
                pending.done.record(self.prefill_stream)
        self.stats.prefill_s += time.perf_counter() - start
        return pending

    def _join(self, pendings: list[_Pending], rows: dict[int, _Row], free: list[int]) -> Iterator[GenerationResult]:
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
        with self._decoding():
            tokens = torch.cat([pending.tokens for pending in pendings]) if len(pendings) > 1 else pendings[0].tokens
            first = [int(t) for t in tokens.tolist()]
            self.decoder.commit(slots, [length for pending in pendings for length in pending.lengths], first)
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prefill_calls += len(pendings)
        self.stats.prompts += len(group)
        yield from self._admit(group, slots, first, rows, free)

    def _admit(
        self, group: list[Prepared], slots: list[int], first: list[int], rows: dict[int, _Row], free: list[int]
    ) -> Iterator[GenerationResult]:
        """Rows for `group` in `slots`, from their first tokens; a row whose first token already ends it is answered
        and freed."""
        for item, slot, token in zip(group, slots, first, strict=True):
            row = _Row(item.request.key, len(item.request.prompt_ids))
            rows[slot] = row
            result = self._advance(row, token)
            if result is not None:
                del rows[slot]
                heapq.heappush(free, slot)
                yield result
        with self._decoding():
            self.decoder.set_active([slot in rows for slot in range(self.slots)])

    @torch.no_grad()
    def _prefill(self, group: list[Prepared], slots: list[int]) -> _Pending:
        """Run the VLM over `group` (right-padded), each row's K/V into its slot; the first tokens, not yet read back.
        Nothing here makes the host wait for the GPU, so decoding steps can be queued while it runs."""
        lengths = [len(item.request.prompt_ids) for item in group]
        width = min(self.max_context, -(-max(lengths) // self.width_bucket) * self.width_bucket)
        input_ids = torch.full(
            (len(group), width), self.pad_id, dtype=torch.long, pin_memory=self.device.type == "cuda"
        )
        for row, item in enumerate(group):
            input_ids[row, : lengths[row]] = torch.tensor(item.request.prompt_ids, dtype=torch.long)
        prompts = input_ids.to(self.device, non_blocking=True)
        seeds = [item.request.seed for item in group]
        inputs: dict[str, torch.Tensor] = {"input_ids": prompts}
        for name in {name for item in group for name in item.pixels}:
            inputs[name] = self._stacked([item.pixels[name] for item in group if name in item.pixels])
            if self.device_pixels is not None:
                inputs[name] = self.device_pixels.values(name, inputs[name]).to(self.dtype)
        if self.prefill_mode == "own":
            # Flat [rows * width, hidden]: the layer functions see one token per row, as in decode.
            embeds = self.model.get_input_embeddings()(inputs.pop("input_ids").view(-1))
            if inputs:
                features = self.vision(inputs)
                # The image tokens' rows, found on the host (masked_scatter would count them on the device: a wait)
                image_rows = self.decoder.device_longs(
                    (input_ids.view(-1) == self.image_token_id).nonzero()[:, 0].tolist()
                )
                embeds = embeds.index_copy(0, image_rows, features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
            return _Pending(group, slots, lengths, self.decoder.prefill(embeds, width, slots, lengths, prompts, seeds))
        output = self.model.model(**inputs, use_cache=True)
        lengths_t = torch.tensor(lengths, device=self.device)
        hidden = output.last_hidden_state[torch.arange(len(group), device=self.device), lengths_t - 1]
        logits = self.model.lm_head(hidden)
        tokens = self.decoder.first_tokens(self.decoder.device_longs(slots), lengths_t, logits, prompts, seeds)
        keys, values = _cache_tensors(output.past_key_values)
        self.decoder.load(slots, keys, values)
        return _Pending(group, slots, lengths, tokens)

    def _stacked(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The images' pixel tensors, concatenated on the device. On CUDA each pinned piece is copied into its rows:
        no host copy (a concatenation on the host is pageable memory, whose copy makes the host wait for the stream)."""
        if self.device.type != "cuda":
            return torch.cat(tensors)
        stacked = torch.empty(
            (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=self.device
        )
        start = 0
        for tensor in tensors:
            stacked[start : start + tensor.shape[0]].copy_(tensor, non_blocking=True)
            start += tensor.shape[0]
        return stacked

    def _decode(self, rows: dict[int, _Row], free: list[int]) -> Iterator[GenerationResult]:
        """Up to `decode_window` steps for every decoding row, then one read of their tokens (with `lookahead`, of the
        window launched before these steps); finished rows are answered and their slots freed."""
        start = time.perf_counter()
        launched = self._launch_window(rows)
        if self.lookahead:
            launched, self._in_flight = self._in_flight, launched
        steps = launched.read() if launched is not None else []  # the one wait for the GPU
        self.stats.decode_s += time.perf_counter() - start
        if launched is None:  # lookahead: nothing was in flight yet
            return
        finished: dict[int, GenerationResult] = {}
        for slot, row in launched.rows:
            row.ahead -= len(steps)
            if rows.get(slot) is not row:  # stopped in a window read before (its slot may hold a new row now)
                continue
            for tokens in steps:
                result = self._advance(row, int(tokens[slot]))
                if result is not None:
                    finished[slot] = result
                    break
        for slot in finished:
            del rows[slot]
            heapq.heappush(free, slot)
        if finished:
            with self._decoding():
                self.decoder.set_active([slot in rows for slot in range(self.slots)])
        yield from finished.values()

    def _launch_window(self, rows: dict[int, _Row]) -> _Window | None:
        """Launch up to `decode_window` steps for every decoding row, their tokens copied back without a wait; None
        (lookahead only) when a row's slot has no room for another step, or no row needs one, before the window in
        flight is read."""
        span = max(rows) + 1
        step_rows = next(b for b in self.row_buckets if b >= span)
        # A row's step writes its newest token's K/V at position (prompt + tokens so far - 1): the window stays
        # within every row's slot, and the columns cover the positions its last step attends to. Steps launched and
        # not read yet count: a row that stopped in them is not known to have stopped.
        filled = max(row.prompt_length + len(row.tokens) + row.ahead for row in rows.values())
        # No more steps than the row furthest from max_new_tokens needs: past that every token is dropped (with
        # lookahead, once every row's window in flight brings it to max_new_tokens, nothing more is launched).
        needed = max(self.max_new_tokens - len(row.tokens) - row.ahead for row in rows.values())
        window = min(self.decode_window, self.max_context - filled + 1, needed)
        if window < 1:
            return None
        longest = filled + window - 1
        columns = min(self.max_context, -(-longest // self.column_bucket) * self.column_bucket)
        launched = []
        with self._decoding():
            for index in range(window):
                self.decoder.step(step_rows, columns)
                tokens = self.decoder.tokens[:step_rows]
                launched.append(tokens if index == window - 1 and not self.lookahead else tokens.clone())
            stacked = torch.stack(launched) if window > 1 else launched[0][None]
            done = None
            if self.device.type == "cuda":
                host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
                stacked = host.copy_(stacked, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
        self.stats.decode_steps += window
        for row in rows.values():
            row.ahead += window
        return _Window(list(rows.items()), stacked, done)

    def _advance(self, row: _Row, token: int) -> GenerationResult | None:
        """Take one generated token; the row's result once it stops."""
        if self.eos_id is not None and token == self.eos_id:
            return GenerationResult(row.key, row.tokens, "stop")
        row.tokens.append(token)
        self.stats.generated_tokens += 1
        if len(row.tokens) >= self.max_new_tokens:
            return GenerationResult(row.key, row.tokens, "length")
        return None


def _cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V ([batch, kv_heads, tokens, head_dim]) of a transformers DynamicCache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [layer.keys for layer in layers], [layer.values for layer in layers]
    return list(cache.key_cache), list(cache.value_cache)
