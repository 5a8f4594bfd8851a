"""Generation benchmark: FastEngine against plain `model.generate`, same prompts, same run.

Every prompt is one image (a random 640x480 picture, preprocessed to 384 px, and 1024 px for the 7b's SAM
tower) and about 32 text tokens in the `deepseek` template (no system prompt); 128 new tokens are forced
(EOS masked, as `min_new_tokens` does in generate). Models are random-initialised with the released
architectures (DESIGN.md §5), bf16, SDPA, built on the GPU without a checkpoint on disk.

Rows, per model:
  generate      plain `model.generate` on a batch of 32 after a short warm-up, timed twice, the row the second call
                (the baseline; its tokens are the reference; before session 26's last change one call, which
                carried first-use costs); generate-sampled: the same with --sample-alt's settings
  engine        FastEngine with `max_batch` B over B prompts (one warm-up pass over the same prompts
                first: CUDA-graph capture and compilation, then --repeats timed passes, the row the median one),
                for each B of --batches
  engine-sampled  with --sample-alt: the engine sampling with those settings (seeded draws: vlmops.infer.sampling)
  engine-eager  the same at batch 32 without torch.compile; engine-matmul: matmul attention in decode;
                engine-model-prefill: prefill through the VLM's own forward (what each choice buys)
  budget        the 7b under `memory_gib` (default 75, inside an 80 GB card) with up to 256 slots; with an
                alternative (--eager-prefill-alt, ...), a budget row with it too
  generate-rebatched  generate again on the same 32 prompts in two batches of 16: how far bf16 generate
                agrees with itself when only the batching changes (the noise floor of the match rate)
  float32       the 1.3b in float32 on the GPU (CUDA graphs and compilation on): engine vs generate,
                which must agree on every token

tokens/s = generated tokens / wall time of the whole call (image preprocessing, prefill and decode), the median of
--repeats calls (range: the slowest and the fastest); image wait = the host's time waiting for the image threads;
decode tokens/s counts decode steps only; match = share of the 32 x 128 reference token positions where
the engine's token equals generate's (a single early divergence lowers every later position of its row).

    python bench/infer_bench.py --out bench/results/infer-DATE.json          # GPU, both models
    python bench/infer_bench.py --size tiny --device cpu --batches 4,8       # smoke test on CPU
    python bench/infer_bench.py --e2e                                        # + images decoded from files

Prints one table; writes the rows, machine, versions and command as JSON to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.profiling import (  # noqa: E402
    cpu_ops,
    cuda_kernels,
    gpu_time_summary,
    idle_gaps,
    idle_timeline,
    op_tables,
)
from bench.results_file import gpu_machine, write_results  # noqa: E402
from vlmops.config import InferConfig  # noqa: E402
from vlmops.conversation import ImageRef, Message  # noqa: E402
from vlmops.infer.engine import GenerationRequest  # noqa: E402
from vlmops.infer.fast_engine import EngineStats, FastEngine  # noqa: E402
from vlmops.infer.generation import generation_config, model_inputs  # noqa: E402
from vlmops.models.loading import LoadedModel, load_model, load_processor  # noqa: E402
from vlmops.models.template import encode  # noqa: E402

GIB = 2**30
NUM_IMAGE_TOKENS = 576
TEXT_WORDS = 22  # ~32 text tokens with BOS and the template's "User: ... Assistant:"


def build_random(arch: str, size: str, work: Path, device: str) -> LoadedModel:
    """A random-initialised model with the released architecture (or a tiny one) and its processor."""
    from transformers import (
        AutoTokenizer,
        DeepseekVLForConditionalGeneration,
        DeepseekVLHybridForConditionalGeneration,
        DeepseekVLHybridProcessor,
        DeepseekVLProcessor,
    )

    from vlmops.models.template import IMAGE_TOKEN
    from vlmops.models.tiny import build_tiny_model, build_tokenizer
    from vlmops.testing.architectures import architecture_config, released_image_processor

    hybrid = arch == "7b"
    name = "deepseek-vl-7b-chat" if hybrid else "deepseek-vl-1.3b-chat"
    if size == "tiny":
        folder = work / f"tiny-{arch}"
        if not (folder / "config.json").is_file():
            build_tiny_model(folder, "deepseek_vl_hybrid" if hybrid else "deepseek_vl")
        return load_model(folder, dtype="float32" if device == "cpu" else "bfloat16", device=device)
    folder = work / f"processor-{arch}"
    if not (folder / "processor_config.json").is_file():
        # The released tokenizer is not reachable offline; the tiny BPE (same special tokens) fits inside the
        # 102400-token vocabulary. Only the processor is written: the weights live on the GPU alone.
        folder.mkdir(parents=True, exist_ok=True)
        build_tokenizer(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = released_image_processor(name)
        processor_cls: Any = DeepseekVLHybridProcessor if hybrid else DeepseekVLProcessor
        processor_cls(image_processor, tokenizer, num_image_tokens=NUM_IMAGE_TOKENS).save_pretrained(folder)
    processor = load_processor(folder)
    tokenizer = processor.tokenizer
    config = architecture_config(name)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tokenizer, key))
        setattr(config.text_config, key, getattr(tokenizer, key))
    config._attn_implementation = "sdpa"
    if hybrid:
        config.high_res_vision_config._attn_implementation = "sdpa"
    cls = DeepseekVLHybridForConditionalGeneration if hybrid else DeepseekVLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config).to(torch.bfloat16)
    model.eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return LoadedModel(model=model, processor=processor, path=folder, hybrid=hybrid)


def make_requests(loaded: LoadedModel, count: int, images: list[Image.Image], seed: int) -> list[GenerationRequest]:
    from vlmops.models.tiny import _CORPUS_WORDS

    words = _CORPUS_WORDS.split()
    rng = random.Random(seed)
    out = []
    for index in range(count):
        text = " ".join(rng.choice(words) for _ in range(TEXT_WORDS))
        message = Message("user", [ImageRef("bench"), text])
        encoded = encode(
            [message], loaded.tokenizer, loaded.num_image_tokens, system_prompt="", add_generation_prompt=True
        )
        out.append(GenerationRequest(index, encoded.input_ids, [images[index % len(images)]], seed=index))
    return out


def parse_settings(text: str) -> dict[str, Any]:
    """`temperature=0.7,top_p=0.9` as InferConfig keyword arguments (numbers as numbers)."""
    settings: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
    InferConfig(**settings)  # a typo fails here, before any model is built
    return settings


def random_images(count: int, seed: int) -> list[Image.Image]:
    rng = random.Random(seed)
    return [Image.frombytes("RGB", (640, 480), rng.randbytes(640 * 480 * 3)) for _ in range(count)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> tuple[float | None, float | None]:
    if device != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def plain_generate(
    loaded: LoadedModel,
    reqs: list[GenerationRequest],
    new_tokens: int,
    device: str,
    infer: dict[str, Any] | None = None,
) -> tuple[dict[Any, list[int]], float]:
    """`model.generate` on one batch, EOS suppressed (min_new_tokens), with `infer` settings (sampling) if given;
    tokens per key and seconds."""
    config = generation_config(loaded, InferConfig(max_new_tokens=new_tokens, **(infer or {})))
    config.min_new_tokens = new_tokens
    sync(device)
    start = time.perf_counter()
    inputs = model_inputs(loaded, [r.prompt_ids for r in reqs], [image for r in reqs for image in r.images])
    with torch.no_grad():
        output = loaded.model.generate(**inputs, generation_config=config)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
    return {r.key: row for r, row in zip(reqs, tokens, strict=True)}, seconds


def run_engine(
    loaded: LoadedModel,
    reqs: list[GenerationRequest],
    new_tokens: int,
    device: str,
    repeats: int,
    infer: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[dict[Any, list[int]], float, list[float], EngineStats, FastEngine]:
    """One warm-up pass (graph capture, compilation), then `repeats` timed passes over the same requests: the
    median pass's tokens, seconds and stats, and every pass's seconds in order. `infer`: settings of `infer.*`
    (sampling) beside max_new_tokens."""
    engine = FastEngine(loaded, InferConfig(max_new_tokens=new_tokens, **(infer or {})), ignore_eos=True, **kwargs)
    for _ in engine.generate(reqs):
        pass
    passes = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        results = {r.key: r.token_ids for r in engine.generate(reqs)}
        sync(device)
        passes.append((time.perf_counter() - start, results, engine.stats))
    seconds, results, stats = sorted(passes, key=lambda p: p[0])[len(passes) // 2]
    return results, seconds, [p[0] for p in passes], stats, engine


def match_rate(reference: dict[Any, list[int]], got: dict[Any, list[int]]) -> tuple[float, int, float]:
    """(share of equal token positions, rows equal throughout, mean first-divergence position)."""
    equal = total = whole = 0
    divergence = []
    for key, want in reference.items():
        have = got[key]
        same = [a == b for a, b in zip(want, have, strict=False)]
        equal += sum(same)
        total += len(want)
        whole += int(all(same) and len(have) == len(want))
        divergence.append(same.index(False) if False in same else len(want))
    return equal / total, whole, sum(divergence) / len(divergence)


def bench_model(arch: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    device, new_tokens = args.device, args.new_tokens
    batches = [int(b) for b in (args.batches or ("32,64,128,256" if arch == "1.3b" else "32,64,128")).split(",")]
    match_batch = min(32, max(batches)) if args.size == "real" else min(batches)
    reset_memory(device)
    start = time.perf_counter()
    loaded = build_random(arch, args.size, Path(args.work), device)
    print(f"[{arch}] built in {time.perf_counter() - start:.1f} s", flush=True)
    attn = {
        name: getattr(getattr(loaded.model.config, name, None), "_attn_implementation", None)
        for name in ("text_config", "vision_config", "high_res_vision_config")
    }
    print(f"[{arch}] attention: {attn}", flush=True)
    images = random_images(16, seed=1)
    pool = make_requests(loaded, max([*batches, 256 if args.budget else 0, args.profile_batch]), images, seed=0)
    prompt_len = sum(len(r.prompt_ids) for r in pool) / len(pool)
    max_context = -(-(max(len(r.prompt_ids) for r in pool) + new_tokens) // 128) * 128
    base = {
        "model": arch,
        "size": args.size,
        "new_tokens": new_tokens,
        "prompt_tokens": round(prompt_len, 1),
        "image_processor": type(loaded.processor.image_processor).__name__,
    }

    def record(row: dict[str, Any]) -> None:
        row = {**base, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(args, rows)  # after every row: a run stopped at its time limit keeps what it measured

    def guarded(name: str, fn: Any) -> None:
        try:
            fn()
        except Exception as error:  # a failed setting is recorded and the others still run
            traceback.print_exc()
            record({"case": name, "error": f"{type(error).__name__}: {error}"[:500]})
        reset_memory(device)

    plain_generate(loaded, pool[:2], 2, device)  # cuBLAS / cuDNN set-up outside the timing
    reference: dict[Any, list[int]] = {}

    def generate_row(case: str, infer: dict[str, Any] | None = None) -> dict[Any, list[int]]:
        """Plain `generate` over the match batch, timed twice: the row keeps the second call (the first also pays
        first-use costs: in session 26 a sampled `generate` timed right after the greedy one ran 3.6x faster)."""
        calls = []
        for _ in range(2):
            reset_memory(device)
            calls.append(plain_generate(loaded, pool[:match_batch], new_tokens, device, infer))
        tokens, seconds = calls[-1]
        allocated, reserved = peak_gib(device)
        record(
            {
                "case": case,
                "batch": match_batch,
                "prompts": match_batch,
                "seconds": round(seconds, 3),
                "seconds_each": [round(call[1], 3) for call in calls],
                "tokens_per_s": round(match_batch * new_tokens / seconds, 1),
                "peak_allocated_gib": allocated,
                "peak_reserved_gib": reserved,
                **({"settings": {"infer": infer}} if infer else {}),
            }
        )
        return tokens

    def baseline() -> None:
        # A short warm-up first, as the engine rows get theirs: the first CUDA work of the process (library handles,
        # kernel loading) took up to half of a timed call (generate measured 214-392 tokens/s on the same prompts).
        plain_generate(loaded, pool[:2], 4, device)
        reference.update(generate_row("generate"))

    answers: dict[tuple[str, int], dict[Any, list[int]]] = {}  # (case, batch) -> the row's tokens

    def engine_row(case: str, batch: int, prompts: int, same_as: str | None = None, **kwargs: Any) -> None:
        """One engine setting's row; `same_as`: also the share of tokens equal to that case's row at this batch."""
        reset_memory(device)
        reqs = pool[:prompts]
        got, seconds, passes, stats, engine = run_engine(
            loaded,
            reqs,
            new_tokens,
            device,
            args.repeats,
            max_batch=batch,
            max_context=max_context,
            prefill_batch=kwargs.pop("prefill_batch", args.prefill_batch),
            **kwargs,
        )
        allocated, reserved = peak_gib(device)
        row: dict[str, Any] = {
            "case": case,
            "batch": engine.slots,
            "prompts": prompts,
            "seconds": round(seconds, 3),
            "seconds_each": [round(s, 3) for s in passes],
            "tokens_per_s": round(stats.generated_tokens / seconds, 1),
            "tokens_per_s_range": [round(stats.generated_tokens / s, 1) for s in (max(passes), min(passes))],
            "decode_tokens_per_s": round((stats.generated_tokens - stats.prompts) / stats.decode_s, 1),
            "prefill_ms_per_prompt": round(1000 * stats.prefill_s / stats.prompts, 2),
            "decode_ms_per_step": round(1000 * stats.decode_s / stats.decode_steps, 3),
            "image_wait_ms": round(1000 * stats.image_wait_s, 1),
            "first_prefill_ms": round(1000 * (stats.first_prefill_s or 0.0), 1),
            "peak_allocated_gib": allocated,
            "peak_reserved_gib": reserved,
            "settings": dict(kwargs),
        }
        if all(key in got for key in reference):
            rate, whole, divergence = match_rate(reference, got)
            row.update({"match": round(rate, 4), "rows_equal": whole, "mean_first_divergence": round(divergence, 1)})
        answers[case, batch] = got
        if same_as is not None and (same_as, batch) in answers:
            row[f"same_as_{same_as}"] = round(match_rate(answers[same_as, batch], got)[0], 4)
        record(row)
        del engine

    guarded("generate", baseline)
    skip = set(filter(None, args.skip.split(",")))
    sampled = parse_settings(args.sample_alt) if args.sample_alt else {}
    if device == "cuda" and "eager" not in skip:
        guarded("engine-eager", lambda: engine_row("engine-eager", match_batch, match_batch, compile=False))
    # The alternatives asked for, each a row per batch and an e2e run beside the defaults: (name, engine settings).
    alternatives: list[tuple[str, dict[str, Any]]] = [
        (name, settings)
        for name, settings, wanted in (
            ("window", {"decode_window": args.window_alt}, bool(args.window_alt)),
            ("eager-prefill", {"prefill_graphs": False}, args.eager_prefill_alt),
            ("overlap", {"overlap_prefill": True}, args.overlap_alt),
            ("no-lookahead", {"lookahead": False}, args.no_lookahead_alt),
            ("eager-towers", {"vision_graphs": False}, args.eager_towers_alt),
            ("sam-flex", {"sam_attention": "flex"}, args.sam_flex_alt),
            ("sam-sdpa", {"sam_attention": "sdpa"}, args.sam_sdpa_alt),
            ("eager-siglip", {"siglip_compile": False}, args.eager_siglip_alt),
            ("switch", {"switch_interval": args.switch_interval_alt / 1000}, bool(args.switch_interval_alt)),
            ("columns", {"column_bucket": args.column_bucket_alt}, bool(args.column_bucket_alt)),
            ("first-prefill", {"first_prefill": args.first_prefill_alt}, bool(args.first_prefill_alt)),
            ("sampled", {"infer": sampled}, bool(sampled)),
        )
        if wanted
    ]
    if sampled:  # the baseline of the sampled rows: generate with the same settings on the same prompts
        guarded("generate-sampled", lambda: generate_row("generate-sampled", sampled))
    for batch in batches:
        guarded(f"engine-{batch}", lambda b=batch: engine_row("engine", b, b))
        for name, settings in alternatives:
            guarded(
                f"engine-{batch}-{name}",
                lambda b=batch, n=name, s=settings: engine_row(f"engine-{n}", b, b, same_as="engine", **s),
            )
    if device == "cuda" and "matmul" not in skip:
        guarded(
            "engine-matmul-attention",
            lambda: engine_row("engine-matmul", max(batches), max(batches), attention="matmul"),
        )
    if args.prefill_alt and device == "cuda":
        guarded(
            "engine-prefill-alt",
            lambda: engine_row("engine", max(batches), max(batches), prefill_batch=args.prefill_alt),
        )
    if device == "cuda" and "model-prefill" not in skip:
        guarded(
            "engine-model-prefill",
            lambda: engine_row("engine-model-prefill", max(batches), max(batches), prefill="model"),
        )
    if args.budget and arch == "7b":
        budget = {"memory_gib": args.budget, "prefill_batch": min(8, args.prefill_batch)}
        guarded("budget", lambda: engine_row("budget", 256, 256, **budget))
        for name, settings in alternatives:  # what each alternative costs the 80 GB card
            guarded(f"budget-{name}", lambda n=name, s=settings: engine_row(f"budget-{n}", 256, 256, **budget, **s))
    if args.e2e:
        guarded("e2e", lambda: e2e(loaded, arch, args, max(batches), max_context, record))
        for name, settings in alternatives:
            guarded(
                f"e2e-{name}",
                lambda n=name, s=settings: e2e(
                    loaded, arch, args, max(batches), max_context, record, f"e2e-files-{n}", **s
                ),
            )

    def rebatched() -> None:
        half = match_batch // 2
        first, seconds_a = plain_generate(loaded, pool[:half], new_tokens, device)
        second, seconds_b = plain_generate(loaded, pool[half:match_batch], new_tokens, device)
        rate, whole, divergence = match_rate(reference, {**first, **second})
        record(
            {
                "case": "generate-rebatched",
                "batch": half,
                "prompts": match_batch,
                "seconds": round(seconds_a + seconds_b, 3),
                "tokens_per_s": round(match_batch * new_tokens / (seconds_a + seconds_b), 1),
                "match": round(rate, 4),
                "rows_equal": whole,
                "mean_first_divergence": round(divergence, 1),
            }
        )

    if "rebatched" not in skip:
        guarded("generate-rebatched", rebatched)
    if args.profile and device == "cuda":
        guarded("profile-prefill", lambda: profile_engine(loaded, pool[: args.prefill_batch], max_context, 1))
        guarded("profile-decode", lambda: profile_engine(loaded, pool[:match_batch], max_context, new_tokens))
    if args.profile_batch and device == "cuda":
        guarded(
            "profile-call",
            lambda: profile_engine(
                loaded, pool[: args.profile_batch], max_context, new_tokens, prefill_batch=args.prefill_batch
            ),
        )
    if args.float32 and arch == "1.3b" and device == "cuda":

        def float32() -> None:
            torch.backends.cudnn.allow_tf32 = False  # the vision towers' patch convolutions
            loaded.model.float()
            reference.clear()
            tokens, _ = plain_generate(loaded, pool[:match_batch], new_tokens, device)
            reference.update(tokens)
            engine_row("float32", match_batch, match_batch)

        guarded("float32", float32)


def profile_engine(
    loaded: LoadedModel,
    reqs: list[GenerationRequest],
    max_context: int,
    new_tokens: int,
    prefill_batch: int | None = None,
) -> None:
    """Kernel times of one `generate` call over `reqs` with `new_tokens` forced (by default one prefill batch for all
    of them; 1 token: the prefill alone), after an unprofiled call that compiles and captures."""
    from torch.profiler import ProfilerActivity, profile

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    engine = FastEngine(
        loaded,
        InferConfig(max_new_tokens=new_tokens),
        max_batch=len(reqs),
        max_context=max_context,
        prefill_batch=prefill_batch or len(reqs),
        ignore_eos=True,
    )
    for _ in engine.generate(reqs):
        pass
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        started = time.perf_counter()
        for _ in engine.generate(reqs):
            pass
        sync()
        wall_us = (time.perf_counter() - started) * 1e6
    stats = engine.stats
    print(
        f"PROFILE {len(reqs)} prompts, {new_tokens} new tokens: prefill {1000 * stats.prefill_s:.1f} ms, "
        f"{stats.decode_steps} decode steps {1000 * stats.decode_s:.1f} ms (host clock)",
        flush=True,
    )
    kernels = cuda_kernels(prof)
    host = cpu_ops(prof)
    print("\n".join(gpu_time_summary(kernels, wall_us) + idle_timeline(kernels) + idle_gaps(kernels, host)), flush=True)
    print(op_tables(prof), flush=True)


def e2e(
    loaded: LoadedModel,
    arch: str,
    args: argparse.Namespace,
    batch: int,
    max_context: int,
    record: Any,
    case: str = "e2e-files",
    **engine_kwargs: Any,
) -> None:
    """Images as JPEG/PNG files, opened lazily: the engine's worker threads decode them ahead of the GPU.
    `engine_kwargs`: FastEngine settings of this row (`case`)."""
    folder = Path(args.work) / "e2e-images"
    folder.mkdir(parents=True, exist_ok=True)
    count = 2 * batch
    paths = []
    for index, image in enumerate(random_images(16, seed=2)):
        path = folder / (f"{index}.jpg" if index % 2 else f"{index}.png")
        image.save(path)
        paths.append(path)
    template = make_requests(loaded, count, [Image.new("RGB", (8, 8))], seed=3)

    def requests() -> Any:
        for index, request in enumerate(template):
            image = Image.open(paths[index % len(paths)])
            yield GenerationRequest(request.key, request.prompt_ids, [image], seed=request.seed)

    infer = engine_kwargs.pop("infer", None) or {}
    engine = FastEngine(
        loaded,
        InferConfig(max_new_tokens=args.new_tokens, **infer),
        ignore_eos=True,
        max_batch=batch,
        max_context=max_context,
        prefill_batch=args.prefill_batch,
        image_workers=args.image_workers,
        **engine_kwargs,
    )
    for _ in engine.generate(requests()):
        pass
    sync(args.device)
    start = time.perf_counter()
    done = sum(1 for _ in engine.generate(requests()))
    sync(args.device)
    seconds = time.perf_counter() - start
    stats = engine.stats
    record(
        {
            "case": case,
            "batch": engine.slots,
            "prompts": done,
            "seconds": round(seconds, 3),
            "images_per_s": round(done / seconds, 2),
            "tokens_per_s": round(stats.generated_tokens / seconds, 1),
            "gpu_busy": round((stats.prefill_s + stats.decode_s) / seconds, 3),
            "settings": {"image_workers": args.image_workers, **engine_kwargs},
        }
    )


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | case | batch | tokens/s | range | decode tok/s | prefill ms/prompt | image wait ms "
        "| peak GiB (alloc/reserved) | match |"
    )
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['case']} | | error: {row['error'][:80]} | | | | | | |")
            continue
        peak = (
            f"{row['peak_allocated_gib']:.1f} / {row['peak_reserved_gib']:.1f}"
            if row.get("peak_allocated_gib") is not None
            else "-"
        )
        match = f"{100 * row['match']:.1f}%" if "match" in row else "-"
        spread = "-"
        if len(row.get("tokens_per_s_range", [])) == 2:
            spread = "{:,.0f}-{:,.0f}".format(*row["tokens_per_s_range"])
        lines.append(
            f"| {row['model']} | {row['case']} | {row['batch']} | {row['tokens_per_s']:,.0f} | {spread} | "
            f"{row.get('decode_tokens_per_s', '-')} | {row.get('prefill_ms_per_prompt', '-')} | "
            f"{row.get('image_wait_ms', '-')} | {peak} | {match} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.3b,7b")
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default=None, help="engine batch sizes (default 32..256 / 32..128)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument("--budget", type=float, default=75.0, help="memory_gib of the 7b budget row (0: skip)")
    parser.add_argument("--image-workers", type=int, default=8)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed calls per engine row after its warm-up: the row reports the median call (and the range); one "
        "call of the 1.3b at batch 32 (0.55-0.6 s) moved by up to 8%% between calls",
    )
    parser.add_argument("--e2e", action="store_true", help="also decode image files through the engine")
    parser.add_argument("--prefill-alt", type=int, default=0, help="prefill batch of an extra row (0: skip)")
    parser.add_argument(
        "--window-alt", type=int, default=0, help="decode window of an extra row per batch and e2e run (0: skip)"
    )
    parser.add_argument(
        "--eager-prefill-alt",
        action="store_true",
        help="an extra row per batch and e2e run with the prefill's language model run eagerly "
        "(infer.prefill_graphs false)",
    )
    parser.add_argument(
        "--eager-towers-alt",
        action="store_true",
        help="an extra row per batch and e2e run with the vision towers run eagerly (infer.vision_graphs false)",
    )
    parser.add_argument(
        "--sam-flex-alt",
        action="store_true",
        help="an extra row per batch and e2e run with the 7b's SAM attention in FlexAttention (infer.sam_attention flex)",
    )
    parser.add_argument(
        "--sam-sdpa-alt",
        action="store_true",
        help="an extra row per batch and e2e run with the 7b's SAM attention as transformers runs it, the dense "
        "relative-position bias materialised (infer.sam_attention sdpa; the default folds it into the query and key)",
    )
    parser.add_argument(
        "--eager-siglip-alt",
        action="store_true",
        help="an extra row per batch and e2e run with the SigLIP tower run eagerly (infer.siglip_compile false; the "
        "default compiles it)",
    )
    parser.add_argument(
        "--no-lookahead-alt",
        action="store_true",
        help="an extra row per batch and e2e run reading each decoding window back before launching the next "
        "(infer.lookahead false)",
    )
    parser.add_argument(
        "--overlap-alt",
        action="store_true",
        help="an extra row per batch and e2e run with prefills on their own stream beside decoding "
        "(infer.overlap_prefill)",
    )
    parser.add_argument(
        "--switch-interval-alt",
        type=float,
        default=0,
        help="Python's thread switch interval in ms of an extra row per batch and e2e run (the engine's "
        "switch_interval; 0: skip)",
    )
    parser.add_argument(
        "--column-bucket-alt",
        type=int,
        default=0,
        help="the decode step's cache columns rounded up to this many (the engine's column_bucket, 32) in an extra "
        "row per batch and e2e run: fewer columns read past the rows' lengths, more graphs captured (0: skip)",
    )
    parser.add_argument(
        "--first-prefill-alt",
        type=int,
        default=0,
        help="prompts in a call's first prefill (the engine's first_prefill; default one per image thread, 8 on a "
        "16-core machine) in an extra row per batch and e2e run; 16, a whole prefill batch, was the default before "
        "session 22 (0: skip)",
    )
    parser.add_argument(
        "--sample-alt",
        nargs="?",
        const="temperature=0.7,top_p=0.9",
        default=None,
        metavar="SETTINGS",
        help="an extra row per batch and e2e run sampling with these infer settings (default temperature=0.7,top_p=0.9; "
        "e.g. temperature=1,top_k=50,repetition_penalty=1.1), and plain generate with the same settings at batch 32",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of rows to leave out (to spend less device time): eager, matmul, model-prefill, rebatched",
    )
    parser.add_argument("--float32", action="store_true", help="also check the 1.3b in float32 on the GPU")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the kernel times and GPU idle gaps of one prefill batch, then of a batch's whole call",
    )
    parser.add_argument(
        "--profile-batch",
        type=int,
        default=0,
        help="print the kernel times and GPU idle gaps of one call of this many prompts with the engine's own prefill "
        "batch (--prefill-batch), as the engine rows run it (0: skip)",
    )
    parser.add_argument("--work", default="/tmp/infer-bench")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for arch in args.models.split(","):
        bench_model(arch, args, rows)
        reset_memory(args.device)  # the model goes with bench_model's frame
    print(table(rows))
    return 0


def save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if not args.out:
        return
    machine = platform.node()
    if args.device == "cuda":
        machine = gpu_machine()
    write_results(args.out, machine, rows, cpus=os.cpu_count())


if __name__ == "__main__":
    raise SystemExit(main())
