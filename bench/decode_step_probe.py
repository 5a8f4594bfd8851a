"""The 7b's decode step by part on the GPU: each GEMM and the attention timed from one CUDA graph over 30 layers' own
bf16 weights (so L2 holds none), at 32 and 192 rows, against the HBM-bandwidth floor of the same bytes.

    python bench/decode_step_probe.py --out bench/results/decode-step-DATE-7b.json

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
SHAPES = {
    "qkv": (3 * HIDDEN, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (2 * INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
}
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
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
