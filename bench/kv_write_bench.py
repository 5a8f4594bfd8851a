"""Writing K/V into FastEngine's static cache: plain elements against `wide` ones (8 bytes each).

FastEngine (vlmops.infer.fast_decode) keeps one cache `[layers, 2, slots, kv_heads, max_context, head_dim]`. Each
layer of a prefill scatters its rows' K/V (`[2, rows, kv_heads, width, head_dim]`, a strided view of the q/k/v
projection) into their slots with `index_copy_`, and each decode step writes one column a row with `index_put_`.
Both kernels pay by the element, so the engine moves each head vector as 8-byte elements (`wide`). Cases, on the
same tensors and layouts as the engine's:

- `prefill plain`: `index_copy_` on the model's dtype (what the engine did before session 21: the same-run
  baseline);
- `prefill wide`: the same through `wide` (the engine's path);
- `step plain`, `step wide`: a decode step's one-column write, the same way.

Each case's cache must equal its plain case's, byte for byte. Timed over CUDA-graph replays of 10 calls (on CPU a
plain loop: a smoke run, not a measurement).

    python bench/kv_write_bench.py --out bench/results/kv-write-$(date +%F).json
    python bench/kv_write_bench.py --device cpu --shapes 4x4x64 --repeats 2   # CPU smoke

Prints a table (µs a call, TB/s read and written); `--out` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.decode_attention_bench import time_call  # noqa: E402
from bench.results_file import write_results  # noqa: E402
from vlmops.infer.fast_decode import wide  # noqa: E402

# kv_heads x prefill rows x width: the 1.3b (16 heads) and the 7b (32) with prompts of ~626 tokens in a width of 640,
# prefills of 16 and 32 rows; a decode step writes one column for each of 32 or 256 rows.
SHAPES = "16x16x640,16x32x640,32x16x640"
STEP_ROWS = (32, 256)
HEAD_DIM = 128
MAX_CONTEXT = 832
SLOTS = 256

Cases = dict[str, Callable[[], None]]


def prefill_cases(kv_heads: int, rows: int, width: int, device: str) -> tuple[torch.Tensor, Cases]:
    """The cache and the two ways to scatter one layer's prefill into `rows` random slots."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    cache = torch.zeros(2, SLOTS, kv_heads, MAX_CONTEXT, HEAD_DIM, device=device, dtype=dtype)
    # The projection's output as the engine has it: q (as many heads as K/V here), then K and V, per token.
    projection = torch.randn(rows * width, 3 * kv_heads, HEAD_DIM, device=device, dtype=dtype, generator=generator)
    kv = projection[:, kv_heads:].reshape(rows, width, 2, kv_heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
    index = torch.randperm(SLOTS, device=device, generator=generator)[:rows]

    def plain() -> None:
        cache[:, :, :, :width].index_copy_(1, index, kv)

    def wide_write() -> None:
        target, source = wide(cache[:, :, :, :width], kv)
        target.index_copy_(1, index, source)

    return cache, {"prefill plain": plain, "prefill wide": wide_write}


def step_cases(kv_heads: int, rows: int, device: str) -> tuple[torch.Tensor, Cases]:
    """The cache and the two ways to write a decode step's K/V, one column a row, at the rows' own positions."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    cache = torch.zeros(2, SLOTS, kv_heads, MAX_CONTEXT, HEAD_DIM, device=device, dtype=dtype)
    projection = torch.randn(rows, 3 * kv_heads, HEAD_DIM, device=device, dtype=dtype, generator=generator)
    kv = projection[:, kv_heads:].view(rows, 2, kv_heads, HEAD_DIM)
    index = torch.arange(rows, device=device)
    positions = torch.randint(600, MAX_CONTEXT - 1, (rows,), device=device, generator=generator)

    def plain() -> None:
        cache[:, index, :, positions] = kv

    def wide_write() -> None:
        target, source = wide(cache, kv)
        target[:, index, :, positions] = source

    return cache, {"step plain": plain, "step wide": wide_write}


def measure(made: tuple[torch.Tensor, Cases], moved: int, shape: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    cache, found = made
    cuda = cache.is_cuda
    out, reference = [], None
    for name, fn in found.items():
        cache.zero_()
        fn()
        if reference is None:  # the plain case comes first
            reference = cache.clone()
        row: dict[str, Any] = {**shape, "case": name, "same": bool(torch.equal(cache, reference))}
        us = time_call(fn, repeats, cuda)
        row["us"] = round(us, 1)
        row["tb_per_s"] = round(moved / us / 1e6, 2)
        out.append(row)
    base = out[0]["us"]
    for row in out:
        row["vs_plain"] = round(base / row["us"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=SHAPES, help="comma list of KV_HEADSxROWSxWIDTH (prefills)")
    parser.add_argument("--repeats", type=int, default=50, help="timed graph replays (calls on CPU) a case")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    heads_seen = []
    for spec in filter(None, args.shapes.split(",")):
        try:
            kv_heads, prefill_rows, width = (int(x) for x in spec.split("x"))
        except ValueError:
            parser.error(f"--shapes: {spec!r} is not KV_HEADSxROWSxWIDTH (e.g. 16x32x640)")
        if not 0 < width < MAX_CONTEXT or not 0 < prefill_rows <= SLOTS:
            parser.error(f"--shapes: {spec!r} needs width below {MAX_CONTEXT} and at most {SLOTS} rows")
        element = 2 if args.device == "cuda" else 4
        moved = 2 * (2 * prefill_rows * kv_heads * width * HEAD_DIM * element)  # read and written
        shape = {"kv_heads": kv_heads, "rows": prefill_rows, "width": width}
        rows += measure(prefill_cases(kv_heads, prefill_rows, width, args.device), moved, shape, args.repeats)
        if kv_heads not in heads_seen:
            heads_seen.append(kv_heads)
            for step_rows in STEP_ROWS:
                moved = 2 * (2 * step_rows * kv_heads * HEAD_DIM * element)
                shape = {"kv_heads": kv_heads, "rows": step_rows, "width": 1}
                rows += measure(step_cases(kv_heads, step_rows, args.device), moved, shape, args.repeats)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"{machine}: one layer's K/V into a cache of {SLOTS} slots x {MAX_CONTEXT} columns, head_dim {HEAD_DIM}")
    print("| kv heads | rows | width | case | µs a call | TB/s read + written | vs plain | same bytes |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r['kv_heads']} | {r['rows']} | {r['width']} | {r['case']} | {r['us']:.1f} | {r['tb_per_s']:.2f} | "
            f"{r['vs_plain']} | {r['same']} |"
        )
    if args.out:
        write_results(args.out, machine, rows, head_dim=HEAD_DIM, max_context=MAX_CONTEXT, baseline="plain")
        print(f"wrote {args.out}")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
