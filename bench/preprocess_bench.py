"""Host-side image preprocessing of the batch-inference engine: what its image threads do before the GPU sees a
pixel (resize, pad to a square, uint8 to pinned memory), for the released 1.3b and 7b image processors.

Three paths over the same 640 x 480 RGB images (already decoded, as the engine's threads receive them), each on 1,
2, 4, ... threads up to `--threads` (one image per task, as the engine submits one prompt per task):

- `processor`: the image processor's own call with float output (what a hand-written loop runs, and the engine
  when `DevicePixels` does not apply);
- `processor-uint8`: the processor's geometry without rescale and normalise (the engine's path before
  `PilGeometry`; rescale and normalise run on the GPU);
- `pil-geometry`: `vlmops.models.pixels.PilGeometry`, the same uint8 values from PIL directly (checked equal to
  `processor-uint8` here, value for value).

For each: milliseconds per image on one thread, and the wall time for 16 images (the first prefill batch of the
1.3b waits for these) and images/s on each thread count.

    python bench/preprocess_bench.py --threads 16 --out bench/results/preprocess-$(date +%F).json

Prints a table; `--out` writes the rows as JSON (date, machine, command, figures; `processor-uint8` is the same-run
baseline of the engine's previous path).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.results_file import write_results  # noqa: E402
from vlmops.models.pixels import PilGeometry, processor_geometry  # noqa: E402
from vlmops.testing.architectures import released_image_processor  # noqa: E402

MODELS = {"1.3b": "deepseek-vl-1.3b-chat", "7b": "deepseek-vl-7b-chat"}
BATCH = 16  # a prefill batch of prompts, one image each


def paths(processor: Any) -> dict[str, Callable[[Image.Image], Any]]:
    geometry = PilGeometry.build(processor)
    if geometry is None:
        raise SystemExit("PilGeometry does not reproduce this processor: nothing to compare")
    return {
        "processor": lambda image: processor([image], return_tensors="pt"),
        "processor-uint8": lambda image: processor_geometry(processor, [image]),
        "pil-geometry": lambda image: geometry([image]),
    }


def per_image_ms(fn: Callable[[Image.Image], Any], images: list[Image.Image], repeats: int) -> float:
    """Best of `repeats` passes over `images` in this thread, in milliseconds per image."""
    fn(images[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            fn(image)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(images)


def threaded(fn: Callable[[Image.Image], Any], images: list[Image.Image], threads: int, repeats: int) -> float:
    """Best wall milliseconds of `repeats` runs over `images` on a pool of `threads` (started beforehand)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, images[:threads]))  # the threads exist before the clock starts
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(fn, images))
            best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.3b,7b", help="comma-separated: 1.3b, 7b")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the most threads tried")
    parser.add_argument("--repeats", type=int, default=5, help="runs per thread count (the best is kept)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(BATCH)]
    counts = sorted({1, *(2**i for i in range(1, 8) if 2**i < args.threads), args.threads})
    rows = []
    for model in args.models.split(","):
        processor = released_image_processor(MODELS[model])
        fns = paths(processor)
        want, got = fns["processor-uint8"](images[0]), fns["pil-geometry"](images[0])
        if any(not torch.equal(got[name], value) for name, value in want.items()):
            raise SystemExit(f"{model}: pil-geometry differs from the processor's uint8 output")
        for path, fn in fns.items():
            one = per_image_ms(fn, images, args.repeats)
            for threads in counts:
                ms = threaded(fn, images, threads, args.repeats)
                rows.append(
                    {
                        "model": model,
                        "path": path,
                        "threads": threads,
                        "ms_per_image_one_thread": round(one, 2),
                        "ms_for_16_images": round(ms, 1),
                        "images_per_s": round(1000 * BATCH / ms, 1),
                    }
                )
    baseline = {(r["model"], r["threads"]): r["ms_for_16_images"] for r in rows if r["path"] == "processor-uint8"}
    for row in rows:
        row["speedup_vs_processor_uint8"] = round(baseline[(row["model"], row["threads"])] / row["ms_for_16_images"], 2)
    print(f"640 x 480 RGB images, {BATCH} per run, one image per task; best of {args.repeats} runs")
    print("| model | path | threads | ms/image (1 thread) | ms for 16 | images/s | vs processor-uint8 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['path']} | {r['threads']} | {r['ms_per_image_one_thread']} | {r['ms_for_16_images']} "
            f"| {r['images_per_s']} | {r['speedup_vs_processor_uint8']}x |"
        )
    if args.out:
        import PIL

        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({platform.node()})"
        write_results(args.out, machine, rows, pillow=PIL.__version__)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
