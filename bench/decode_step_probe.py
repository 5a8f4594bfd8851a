"""The 7b's decode step by part on the GPU: each GEMM and the attention timed from one CUDA graph over 30 layers' own
bf16 weights (so L2 holds none), at 32 and 192 rows, against the HBM-bandwidth floor of the same bytes.

    python bench/decode_step_probe.py --out bench/results/decode-step-DATE-7b.json

`--part mixed` asks what a prompt's prefill would cost inside decode steps (chunked prefill): a step's four GEMMs
over its 32 decode rows plus C prompt tokens, against the decode rows alone plus C tokens' share of a batched prefill
(16 prompts of 640 tokens), for the 7b's and the 1.3b's language models.

Session 27 (bench/RESULTS.md) ran this probe's timing code as `.device/step7b_probe.py`; the reporting (table, date,
machine, floor) was added when it moved here.
"""

from __future__ import annotations

import argparse
import sys
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
    parser.add_argument("--part", choices=("step", "mixed"), default="step", help="the step by part, or mixed steps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
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
