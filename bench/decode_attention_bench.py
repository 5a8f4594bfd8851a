"""The decode step's attention: one query per row over the static KV cache, with each row's length as a mask.

FastEngine's decode step (vlmops.infer.fast_decode) attends each row's new query to the cache columns
`[0, columns)` of its slot: K and V are strided views `[rows, heads, columns, head_dim]` of a cache laid out
`[..., slots, heads, max_context, head_dim]`, and the rows' lengths come as an additive mask. The step is bound by
reading that cache, so what matters is the rate each kernel reads K and V at. Cases, on the same tensors:

- `sdpa`: `F.scaled_dot_product_attention` with the mask, whichever kernel PyTorch picks (the engine's path:
  the same-run baseline);
- `efficient`, `cudnn`: SDPA forced to the memory-efficient or the cuDNN kernel (CUDA only);
- `flex`: FlexAttention compiled, the lengths as a `score_mod` (CUDA only);
- `flash-no-mask`: SDPA's flash kernel without the mask (it attends every column: a rate to compare, not an
  answer).

Each case is checked against `sdpa`'s output and timed over CUDA-graph replays of 10 calls (on CPU, a plain loop:
a smoke run, not a measurement).

    python bench/decode_attention_bench.py --out bench/results/decode-attention-$(date +%F).json
    python bench/decode_attention_bench.py --device cpu --shapes 16x4x64 --repeats 2   # CPU smoke

Prints a table (µs a call, TB/s of K and V read); `--out` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.results_file import write_results  # noqa: E402

# heads x rows x columns: the 1.3b (16 heads) and the 7b (32) at the benchmark's batches, prompts of ~626 tokens
# plus 128 new ones.
SHAPES = "16x32x768,16x256x768,32x32x768,32x128x768"
HEAD_DIM = 128
MAX_CONTEXT = 2048
CALLS_PER_GRAPH = 10


def cases(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    scale = q.shape[-1] ** -0.5

    def forced(backend: SDPBackend, with_mask: bool = True) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if with_mask else None, scale=scale)

        return run

    found: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
    }
    if q.is_cuda:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def score_mod(score: torch.Tensor, b: Any, h: Any, q_index: Any, kv_index: Any) -> torch.Tensor:
            return torch.where(kv_index <= lengths[b], score, -float("inf"))

        found["efficient"] = forced(SDPBackend.EFFICIENT_ATTENTION)
        found["cudnn"] = forced(SDPBackend.CUDNN_ATTENTION)
        found["flex"] = lambda: flex(q, k, v, score_mod=score_mod, scale=scale)
        found["flash-no-mask"] = forced(SDPBackend.FLASH_ATTENTION, with_mask=False)
    return found


def time_call(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Microseconds a call: CUDA-graph replays of `CALLS_PER_GRAPH` calls on CUDA, a plain loop elsewhere."""
    for _ in range(3):
        fn()
    if not cuda:
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (repeats * CALLS_PER_GRAPH) * 1000


def measure(heads: int, rows: int, columns: int, device: str, repeats: int) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch._dynamo.reset()  # FlexAttention compiles per shape: never past dynamo's recompile limit
    generator = torch.Generator(device).manual_seed(0)
    cache = torch.randn(
        2, rows, heads, max(MAX_CONTEXT, columns), HEAD_DIM, device=device, dtype=dtype, generator=generator
    )
    k, v = cache[0, :, :, :columns], cache[1, :, :, :columns]
    q = torch.randn(rows, heads, 1, HEAD_DIM, device=device, dtype=dtype, generator=generator)
    # Each row's last position: the rows of a decode step end within the bucket's last 100 columns.
    lengths = torch.randint(max(columns - 100, 0), columns, (rows,), device=device, generator=generator)
    visible = torch.arange(columns, device=device)[None, :] <= lengths[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))[:, None, None]
    read = 2 * rows * heads * columns * HEAD_DIM * cache.element_size()
    found = cases(q, k, v, mask, lengths)
    reference = found["sdpa"]().float()
    out = []
    for name, fn in found.items():
        row: dict[str, Any] = {"heads": heads, "rows": rows, "columns": columns, "case": name}
        try:
            answer = fn().float()
            us = time_call(fn, repeats, device == "cuda")
        except (RuntimeError, torch.OutOfMemoryError) as err:  # a kernel that does not take these inputs
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        else:
            row["us"] = round(us, 1)
            row["tb_per_s"] = round(read / us / 1e6, 2)
            row["max_abs_diff"] = None if name == "flash-no-mask" else float((answer - reference).abs().max())
        out.append(row)
    base = next((r["us"] for r in out if r["case"] == "sdpa" and "us" in r), None)
    for row in out:
        row["vs_sdpa"] = round(base / row["us"], 2) if base and "us" in row else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=SHAPES, help="comma list of HEADSxROWSxCOLUMNS")
    parser.add_argument("--repeats", type=int, default=50, help="timed graph replays (calls on CPU) a case")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    shapes = []
    for spec in filter(None, args.shapes.split(",")):
        try:
            heads, rows, columns = (int(x) for x in spec.split("x"))
        except ValueError:
            parser.error(f"--shapes: {spec!r} is not HEADSxROWSxCOLUMNS (e.g. 16x32x768)")
        shapes.append((heads, rows, columns))
    rows = [row for shape in shapes for row in measure(*shape, args.device, args.repeats)]
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"{machine}: one query per row, head_dim {HEAD_DIM}, K/V strided in a {MAX_CONTEXT}-column cache")
    print("| heads | rows | columns | case | µs a call | TB/s of K and V | vs sdpa | max abs diff |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['heads']} | {r['rows']} | {r['columns']} | {r['case']} | {r['error']} | | | |")
            continue
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        print(
            f"| {r['heads']} | {r['rows']} | {r['columns']} | {r['case']} | {r['us']:.1f} | {r['tb_per_s']:.2f} | "
            f"{r['vs_sdpa']} | {diff} |"
        )
    if args.out:
        write_results(args.out, machine, rows, head_dim=HEAD_DIM, max_context=MAX_CONTEXT, baseline="sdpa")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
