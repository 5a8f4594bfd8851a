"""FastEngine: DeepSeek-VL generation with batched prefill, a static KV cache and continuous batching.

How a request travels:

1. Worker threads run the image processor on each request's images ahead of the GPU (`image_workers`,
   a bounded look-ahead, so requests are still pulled lazily): its resize and padding, to uint8; the
   rescale and normalise happen on the device as a table lookup (vlmops.models.pixels). A request is checked
   against the engine's limits on the way (vlmops.infer.fast_requests).
2. Prefill: waiting prompts fill the free slots, up to `prefill_batch` at a time, through the VLM's own
   forward (vision towers, features scattered into the image-token positions, the whole LLM) on a
   right-padded batch: a row's real tokens never see the padding after them, so no mask is needed and
   each row's K/V for positions [0, length) land in its slot of the static cache unchanged. Prefills are queued
   back to back, or with `overlap_prefill` run one at a time beside the decoding rows (vlmops.infer.fast_serving
   says how their rows join the decoding batch).
3. Decode: `StaticDecoder` (vlmops.infer.fast_decode) makes one token for every slot per step from
   the static cache, each step a CUDA graph replay on CUDA. A finished row (EOS or `max_new_tokens`)
   yields its result at once and its slot is refilled by waiting prompts (once at least `min_refill`
   slots are free, so prefill runs in batches rather than one prompt at a time). With `lookahead` (the default) the
   next step is launched before the last one's tokens are read back (vlmops.infer.fast_serving).

Tokens are picked as `generate` picks them for the same `infer.*` (vlmops.infer.sampling: transformers' own logits
processors for the repetition penalty, temperature, top-k and top-p): greedy answers equal `model.generate`'s token
for token in float32 (tests/infer/test_fast_engine.py), in bf16 the different kernel choices change rounding
(measured by bench/infer_bench.py); sampled ones draw each request's tokens from its own seed, so a request gets the
same answer whatever else shares its batch.

This module builds the engine (`FastEngine`: its settings, decoder and streams) and starts a `generate` call. The call's
loop of prefills and decoding steps (2 and 3) is in vlmops.infer.fast_serving, the requests' way to it (1) in
vlmops.infer.fast_requests, and the number of slots that fit a memory budget in vlmops.infer.fast_memory.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vlmops.config import InferConfig
from vlmops.errors import UserInputError
from vlmops.infer.engine import GenerationRequest, GenerationResult, refuse_context_without_room
from vlmops.infer.fast_decode import StaticDecoder
from vlmops.infer.fast_memory import GIB, fit_slots, slot_pick_bytes
from vlmops.infer.fast_requests import prepared_requests
from vlmops.infer.fast_serving import Row, Window, serve
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
        self._in_flight: Window | None = None  # with lookahead, the window launched and not read yet
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
            rows: dict[int, Row] = {}
            if self.decode_stream is None or self.prefill_stream is None:
                yield from serve(self, waiting, free, rows)
                return
            current = torch.cuda.current_stream(self.device)
            self.decode_stream.wait_stream(current)  # after what was queued before (the weights, the cache)
            try:
                yield from serve(self, waiting, free, rows)
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
