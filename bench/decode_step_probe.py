"""The 7b's decode step by part on the GPU: each GEMM and the attention timed from one CUDA graph over 30 layers' own
bf16 weights (so L2 holds none), at 32 and 192 rows, against the HBM-bandwidth floor of the same bytes.

    python bench/decode_step_probe.py --out bench/results/decode-step-DATE-7b.json

`--part mixed` asks what a prompt's prefill would cost inside decode steps (chunked prefill): a step's four GEMMs
over its 32 decode rows plus C prompt tokens, against the decode rows alone plus C tokens' share of a batched prefill
(16 prompts of 640 tokens), for the 7b's and the 1.3b's language models.

`--part overlap` asks whether the 7b's prefills and decode steps gain from running at once: a stream of prompts
through R slots (each prompt prefilled once, then 128 decode steps) timed one after the other on the whole card,
against the same work on two CUDA streams, plain or with the decode stream at high priority, and on two green
contexts (disjoint SM partitions, from the CUDA driver through ctypes) with D SMs for decoding and the rest for
prefill. Language-model layers only (GEMMs, SDPA, SiLU), each workload one CUDA graph.

`--part verify` prices speculative decoding's verify step for the 7b: a decode step over R rows of K tokens each
(a draft's K-1 guesses after the row's last token) against the one-token step, so that a draft whose rows keep T
tokens a step on average pays when T exceeds the step's cost ratio. The mask among a row's K new tokens is left out.

Session 27 (bench/RESULTS.md) ran this probe's timing code as `.device/step7b_probe.py`; the reporting (table, date,
machine, floor) was added when it moved here.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import gpu_machine, write_results

LAYERS, HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM, VOCAB = 30, 4096, 11008, 32, 128, 102400  # DeepSeek-VL 7b's LLM


def gemm_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """A Llama layer's four matmuls (q/k/v and gate/up fused, as the engine runs them): (out, in) features."""
    return {
        "qkv": (3 * hidden, hidden),
        "o": (hidden, hidden),
        "gate_up": (2 * intermediate, hidden),
        "down": (hidden, intermediate),
    }


SHAPES = gemm_shapes(HIDDEN, INTERMEDIATE)
# (layers, hidden, intermediate) of the two language models, for --part mixed
MODELS = {"7b": (30, 4096, 11008), "1.3b": (24, 2048, 5632)}
DECODE_ROWS = 32
PREFILL_TOKENS = 16 * 640  # a batched prefill: 16 prompts of an image and ~60 text tokens
COLUMNS = 704  # cache columns a row reads: one image prompt (~626 tokens) and part of its answer
HBM_TBPS = 4.8  # the H200's HBM3e peak: the floor the parts are measured against


def timed_us(fn, reps: int = 20) -> float:
    """Microseconds per replay of `fn` captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000


def row(part: str, rows: int, us: float, nbytes: int, per_step: int) -> dict:
    floor = nbytes / (HBM_TBPS * 1e6)
    return {
        "part": part, "rows": rows, "us": round(us, 2), "tb_per_s": round(nbytes / us / 1e6, 2),
        "ms_a_step": round(us * per_step / 1000, 3), "floor_us": round(floor, 2), "floor_ms_a_step": round(floor * per_step / 1000, 3),
    }  # fmt: skip


def mixed_rows() -> list[dict]:
    """Per model: the step's GEMMs (every layer, in one graph) over the decode rows plus C prompt tokens, and what the
    same C tokens cost in a batched prefill; `saved` is the share of the C tokens' prefill GEMM time the mixed step
    does not add."""
    out = []
    for model, (layers, hidden, intermediate) in MODELS.items():
        shapes = gemm_shapes(hidden, intermediate)
        weights = [
            [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in shapes.values()] for _ in range(layers)
        ]

        def step_ms(tokens: int, weights=weights, hidden=hidden, intermediate=intermediate) -> float:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            y = torch.randn(tokens, intermediate, device="cuda", dtype=torch.bfloat16)

            def run() -> None:
                for qkv, o, gate_up, down in weights:
                    F.linear(x, qkv), F.linear(x, o), F.linear(x, gate_up), F.linear(y, down)

            return timed_us(run, reps=10 if tokens > 4096 else 20) / 1000

        per_token = step_ms(PREFILL_TOKENS) / PREFILL_TOKENS
        decode = step_ms(DECODE_ROWS)
        for chunk in (0, 32, 64, 128, 160, 256, 384, 640):
            mixed = step_ms(DECODE_ROWS + chunk) if chunk else decode
            apart = decode + chunk * per_token
            out.append({
                "model": model, "decode_rows": DECODE_ROWS, "prompt_tokens": chunk, "mixed_ms": round(mixed, 3),
                "decode_ms": round(decode, 3), "prefill_share_ms": round(chunk * per_token, 3), "apart_ms": round(apart, 3),
                "saved": round(1 - (mixed - decode) / (chunk * per_token), 3) if chunk else None,
            })  # fmt: skip
        del weights
        torch.cuda.empty_cache()
    return out


OVERLAP_PROMPTS = 8  # prompts in one prefill graph (640 tokens each)
ANSWER_TOKENS = 128  # decode steps a prompt takes: a stream through R slots admits R / 128 prompts a step


def overlap_rows(slots: tuple[int, ...], decode_sms: tuple[int, ...]) -> list[dict]:
    """Per slot count R: tokens/s of a stream through R slots, its prefills and decode steps one after the other on
    the whole card (the baseline) and at once on two streams (plain, decode at high priority, green contexts)."""
    layers, hidden, intermediate = MODELS["7b"]
    shapes = gemm_shapes(hidden, intermediate)
    weights = [
        [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in shapes.values()] for _ in range(layers)
    ]
    most = max(slots)
    caches = [
        [torch.randn(most, HEADS, COLUMNS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        for _ in range(layers)
    ]

    def layers_forward(x: torch.Tensor, attend) -> torch.Tensor:
        for (qkv, o, gate_up, down), cache in zip(weights, caches, strict=True):
            q, k, v = F.linear(x, qkv).chunk(3, dim=-1)
            x = x + F.linear(attend(q, k, v, cache), o)
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down)
        return x

    def prefill_attention(q, k, v, _cache):
        q, k, v = (t.view(OVERLAP_PROMPTS, -1, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(-1, HEADS * HEAD_DIM)

    prompt = torch.randn(OVERLAP_PROMPTS * 640, hidden, device="cuda", dtype=torch.bfloat16)

    def prefill_fn() -> torch.Tensor:
        return layers_forward(prompt, prefill_attention)

    prefill = captured(prefill_fn)
    progress("prefill graph captured")
    out = []
    for rows in slots:
        step_in = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)

        def decode_attention(q, _k, _v, cache, rows=rows):
            query = q.view(rows, HEADS, 1, HEAD_DIM)
            return F.scaled_dot_product_attention(query, cache[0][:rows], cache[1][:rows]).reshape(rows, -1)

        def step_fn(step_in=step_in, attend=decode_attention) -> torch.Tensor:
            return layers_forward(step_in, attend)

        step = captured(step_fn)
        # the work of 2 prefill graphs and the decode steps their 16 prompts' answers take through R slots
        prefills, steps = 2, 2 * OVERLAP_PROMPTS * ANSWER_TOKENS // rows
        tokens = steps * rows
        alone_p = replays_ms([(prefill, None, prefills)])
        alone_d = replays_ms([(step, None, steps)])
        progress(f"{rows} slots: prefill {alone_p / prefills:.2f} ms, step {alone_d / steps:.3f} ms alone")
        base = {"model": "7b", "slots": rows, "prefills": prefills, "steps": steps, "prefill_ms": round(alone_p / prefills, 2),
                "step_ms": round(alone_d / steps, 3), "apart_ms": round(alone_p + alone_d, 1),
                "apart_tokens_per_s": round(tokens / (alone_p + alone_d) * 1000)}  # fmt: skip
        cases: list[tuple[str, torch.cuda.Stream, torch.cuda.Stream, bool]] = [
            ("two streams", torch.cuda.Stream(), torch.cuda.Stream(), False),
            ("decode stream at high priority", torch.cuda.Stream(), torch.cuda.Stream(priority=-1), False),
        ]
        for sms in decode_sms:
            try:
                (decode_stream, got), (prefill_stream, rest) = green_streams(sms)
            except (OSError, RuntimeError) as err:
                out.append({**base, "case": f"green contexts, {sms} SMs for decoding", "error": str(err)})
                continue
            cases.append((f"green: decode {got} SMs, prefill {rest}", prefill_stream, decode_stream, True))
        for case, prefill_stream, decode_stream, own_graphs in cases:
            try:
                # a green context's graphs captured on its own stream
                here_p = captured(prefill_fn, prefill_stream) if own_graphs else prefill
                here_s = captured(step_fn, decode_stream) if own_graphs else step
                parted_p = replays_ms([(here_p, prefill_stream, prefills)])
                progress(f"{rows} slots, {case}: prefill alone there {parted_p / prefills:.2f} ms")
                parted_d = replays_ms([(here_s, decode_stream, steps)])
                progress(f"{rows} slots, {case}: step alone there {parted_d / steps:.3f} ms")
                together = replays_ms([(here_p, prefill_stream, prefills), (here_s, decode_stream, steps)])
                progress(f"{rows} slots, {case}: together {together:.1f} ms against {alone_p + alone_d:.1f} apart")
            except RuntimeError as err:
                out.append({**base, "case": case, "error": str(err)})
                continue
            out.append({
                **base, "case": case, "prefill_alone_there_ms": round(parted_p / prefills, 2),
                "step_alone_there_ms": round(parted_d / steps, 3), "together_ms": round(together, 1),
                "together_tokens_per_s": round(tokens / together * 1000),
                "gain": round((alone_p + alone_d) / together, 3),
            })  # fmt: skip
        del step
    return out


def verify_rows(slots: tuple[int, ...], tokens: tuple[int, ...]) -> list[dict]:
    """Per slot count R and tokens a row K: the 7b's step over R x K tokens (each row's K queries attend to its own
    cache), against K = 1."""
    layers, hidden, intermediate = MODELS["7b"]
    weights = [
        [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in gemm_shapes(hidden, intermediate).values()]
        for _ in range(layers)
    ]
    most = max(slots)
    caches = [
        [torch.randn(most, HEADS, COLUMNS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        for _ in range(layers)
    ]
    out = []
    for rows in slots:
        one = None
        for k in tokens:
            x = torch.randn(rows * k, hidden, device="cuda", dtype=torch.bfloat16)

            def step(x=x, rows=rows, k=k) -> None:
                h = x
                for (qkv, o, gate_up, down), (keys, values) in zip(weights, caches, strict=True):
                    q = F.linear(h, qkv)[:, :hidden].view(rows, k, HEADS, HEAD_DIM).transpose(1, 2)
                    attn = F.scaled_dot_product_attention(q, keys[:rows], values[:rows])
                    h = h + F.linear(attn.transpose(1, 2).reshape(rows * k, hidden), o)
                    gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
                    h = h + F.linear(F.silu(gate) * up, down)

            ms = timed_us(step) / 1000
            one = one or ms
            out.append({"model": "7b", "slots": rows, "tokens_a_row": k, "step_ms": round(ms, 3),
                        "cost_ratio": round(ms / one, 3), "tokens_per_s_if_all_kept": round(rows * k / ms * 1000)})  # fmt: skip
            progress(f"{rows} rows x {k} tokens: {ms:.3f} ms a step ({ms / one:.2f}x one token)")
    return out


def print_verify(rows: list[dict]) -> None:
    print(
        "| slots | tokens a row | step ms | cost against one token | tokens/s if every token is kept |\n"
        "| ---: | ---: | ---: | ---: | ---: |"
    )
    for r in rows:
        print(
            f"| {r['slots']} | {r['tokens_a_row']} | {r['step_ms']} | {r['cost_ratio']:.2f}x | "
            f"{r['tokens_per_s_if_all_kept']:,} |"
        )


def progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def captured(fn, stream: torch.cuda.Stream | None = None) -> torch.cuda.CUDAGraph:
    """`fn` captured in a CUDA graph (after a warm-up) on a stream of its own, or `stream` (a green context's: a graph
    captured elsewhere and replayed there runs on every SM). A captured matmul keeps its capture stream's cuBLAS
    workspace, and two graphs captured on torch's one default capture stream hang replayed at once."""
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    return graph


def replays_ms(work: list[tuple[torch.cuda.CUDAGraph, torch.cuda.Stream | None, int]]) -> float:
    """Wall milliseconds for each graph replayed `times` on its stream (None: the current one), all queued at once,
    the streams' launches interleaved so each has work queued from the start; the best of 2."""
    best = float("inf")
    streams = {stream for _, stream, _ in work if stream is not None}
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        queued = [0] * len(work)
        while any(q < times for q, (_, _, times) in zip(queued, work, strict=True)):
            for i, (graph, stream, times) in enumerate(work):
                if queued[i] < times:
                    with torch.cuda.stream(stream or torch.cuda.current_stream()):
                        graph.replay()
                    queued[i] += 1
        for stream in streams:  # a green context's stream is not the primary context's: the device sync misses it
            stream.synchronize()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def green_streams(decode_sms: int) -> tuple[tuple[torch.cuda.Stream, int], tuple[torch.cuda.Stream, int]]:
    """Two streams on disjoint SM partitions of GPU 0: one of `decode_sms` SMs (the driver rounds it to its
    granularity) and one of the rest, each with its SM count. The CUDA driver's green contexts through ctypes:
    torch's `GreenContext.create(num_sms=)` splits from the whole device each time, so two of them share SMs."""
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(result: int, call: str) -> None:
        if result != 0:
            raise RuntimeError(f"{call} returned CUDA error {result}")

    size = 512  # more than any CUdevResource (type, 92 bytes of padding, a 48-byte union, a next pointer)
    device = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    whole, part, rest = (ctypes.create_string_buffer(size) for _ in range(3))
    check(cuda.cuDeviceGetDevResource(device, whole, 1), "cuDeviceGetDevResource")  # 1: CU_DEV_RESOURCE_TYPE_SM
    groups = ctypes.c_uint(1)
    check(cuda.cuDevSmResourceSplitByCount(part, ctypes.byref(groups), whole, rest, 0, decode_sms), "split")
    streams = []
    for resource in (part, rest):
        desc, context, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        check(cuda.cuDevResourceGenerateDesc(ctypes.byref(desc), resource, 1), "cuDevResourceGenerateDesc")
        check(cuda.cuGreenCtxCreate(ctypes.byref(context), desc, device, 1), "cuGreenCtxCreate")  # 1: default stream
        check(cuda.cuGreenCtxStreamCreate(ctypes.byref(stream), context, 1, 0), "cuGreenCtxStreamCreate")
        sm_count = int.from_bytes(resource.raw[96:100], "little")  # the union's first field: sm.smCount
        streams.append((torch.cuda.ExternalStream(stream.value), sm_count))
    return streams[0], streams[1]


def print_overlap(rows: list[dict]) -> None:
    print(
        "| slots | case | prefill of 8 ms (alone there) | step ms (alone there) | apart: tokens/s | at once: tokens/s | "
        "gain |\n| ---: | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for r in rows:
        if "error" in r:
            print(f"| {r['slots']} | {r['case']} | {r['error']} | | | | |")
            continue
        print(
            f"| {r['slots']} | {r['case']} | {r['prefill_ms']} ({r['prefill_alone_there_ms']}) | {r['step_ms']} "
            f"({r['step_alone_there_ms']}) | {r['apart_tokens_per_s']:,} | {r['together_tokens_per_s']:,} | "
            f"{r['gain']:.2f}x |"
        )


def print_mixed(rows: list[dict]) -> None:
    print(
        "| model | decode rows | prompt tokens | mixed step GEMMs ms | decode alone ms | their prefill share ms | "
        "apart ms | prefill time saved |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for r in rows:
        saved = "—" if r["saved"] is None else f"{r['saved']:.0%}"
        print(
            f"| {r['model']} | {r['decode_rows']} | {r['prompt_tokens']} | {r['mixed_ms']} | {r['decode_ms']} | "
            f"{r['prefill_share_ms']} | {r['apart_ms']} | {saved} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument(
        "--part",
        choices=("step", "mixed", "overlap", "verify"),
        default="step",
        help="the step by part, mixed steps, prefill beside decoding, or speculative decoding's verify step",
    )
    parser.add_argument("--tokens", default="1,2,3,4,6,8", help="--part verify: tokens a row, comma-separated")
    parser.add_argument("--slots", default="32,128", help="--part overlap/verify: decode rows, comma-separated")
    parser.add_argument("--decode-sms", default="16,32,48,64", help="--part overlap: SMs for decoding, comma-separated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    if args.part == "verify":
        torch.manual_seed(0)
        rows = verify_rows(tuple(int(n) for n in args.slots.split(",")), tuple(int(n) for n in args.tokens.split(",")))
        print_verify(rows)
        if args.out:
            write_results(args.out, gpu_machine(), rows, baseline="the one-token decode step, in the same run")
        return 0
    if args.part == "overlap":
        torch.manual_seed(0)
        rows = overlap_rows(
            tuple(int(n) for n in args.slots.split(",")), tuple(int(n) for n in args.decode_sms.split(","))
        )
        print_overlap(rows)
        if args.out:
            write_results(
                args.out,
                gpu_machine(),
                rows,
                baseline="the same prefills and decode steps one after the other on the whole card, in the same run",
            )
        return 0
    if args.part == "mixed":
        torch.manual_seed(0)
        rows = mixed_rows()
        print_mixed(rows)
        if args.out:
            write_results(
                args.out,
                gpu_machine(),
                rows,
                baseline="the same prompt tokens in a batched prefill of 16 prompts, beside a decode-only step",
            )
        return 0
    torch.manual_seed(0)
    weights = {
        k: [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        for k, s in SHAPES.items()
    }
    head = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    rows_out = []
    for rows in (32, 192):
        for part, (n, k) in SHAPES.items():
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            us = timed_us(lambda x=x, part=part: [F.linear(x, w) for w in weights[part]]) / LAYERS
            rows_out.append(row(part, rows, us, n * k * 2, LAYERS))
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        rows_out.append(row("lm_head", rows, timed_us(lambda x=x: F.linear(x, head)), head.numel() * 2, 1))
        if rows == 32:
            caches = [
                torch.randn(2, rows, HEADS, COLUMNS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                for _ in range(LAYERS)
            ]
            q = torch.randn(rows, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            us = (
                timed_us(lambda q=q, caches=caches: [F.scaled_dot_product_attention(q, c[0], c[1]) for c in caches])
                / LAYERS
            )
            rows_out.append(row(f"attention ({COLUMNS} columns)", rows, us, caches[0].numel() * 2, LAYERS))
            del caches
    print(
        "| part | rows | us a layer | TB/s | ms a step | floor ms a step |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for r in rows_out:
        print(
            f"| {r['part']} | {r['rows']} | {r['us']} | {r['tb_per_s']} | {r['ms_a_step']} | {r['floor_ms_a_step']} |"
        )
    if args.out:
        write_results(
            args.out,
            gpu_machine(),
            rows_out,
            baseline=f"the HBM floor: the same bytes at {HBM_TBPS} TB/s",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
