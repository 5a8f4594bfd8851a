"""Peak memory of a batch inference job as its input grows: it must stay flat (streamed input, part files).

Each size runs as a fresh process (`--one`), a whole `run_batch_job` over that many simple records on the
tiny random DeepSeek-VL (CPU, `max_new_tokens` 1 by default), and reports its peak RSS (ru_maxrss). One
record in a hundred carries a small image, so image loading and preprocessing are in the loop too. The claim: the
peak at the largest size is within 10% of the peak at the smallest.

    python bench/batch_rss_bench.py --work /tmp/rss --sizes 10000,100000

Prints a table and appends one JSON row per size to bench/results/batch_rss.jsonl (date, machine, command,
figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "batch_rss.jsonl"
IMAGE_EVERY = 100


def write_prompts(path: Path, count: int, image: Path) -> None:
    """`count` simple records; every IMAGE_EVERY-th asks about the image."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            record: dict[str, object] = {"id": i, "query": f"Prompt {i}: say something short."}
            if i % IMAGE_EVERY == 0:
                record["images"] = [str(image)]
            f.write(json.dumps(record) + "\n")


def prepare(work: Path, sizes: list[int]) -> tuple[Path, dict[int, Path]]:
    from vlmops.data.demo import draw_shape
    from vlmops.models.tiny import build_tiny_model

    model = work / "tiny"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "deepseek_vl", seed=0)
    image = work / "shape.png"
    if not image.is_file():
        import random

        draw_shape("red", "circle", 64, random.Random(0)).save(image)
    inputs = {}
    for size in sizes:
        inputs[size] = work / f"prompts-{size}.jsonl"
        if not inputs[size].is_file():
            write_prompts(inputs[size], size, image)
    return model, inputs


def run_one(model: str, prompts: str, out: str, overrides: list[str]) -> dict[str, object]:
    """One job in this process; its figures and this process's peak RSS."""
    from vlmops.config import load_config
    from vlmops.infer.batch_job import run_batch_job

    started = time.perf_counter()
    result = run_batch_job(model, prompts, out, load_config(None, overrides), progress=False)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "records": result.records,
        "results": result.results,
        "rejects": result.rejects,
        "shards": len(result.manifest["parts"]),
        "seconds": round(seconds, 1),
        "records_per_s": round(result.records / seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (model, inputs, outputs)")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated record counts")
    parser.add_argument("--max-new-tokens", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "PROMPTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = [
        f"infer.max_new_tokens={args.max_new_tokens}",
        f"infer.batch_size={args.batch_size}",
        f"infer.shard_size={args.shard_size}",
        "model.system_prompt=''",  # short prompts: the figure is memory, and 2 CPU cores have 100,000 to answer
    ]
    if args.one:
        print(json.dumps(run_one(*args.one, overrides)), flush=True)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    model, inputs = prepare(args.work, sizes)
    command = "python bench/batch_rss_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    for size in sizes:
        out = args.work / f"out-{size}-{int(time.time())}"
        child = [sys.executable, __file__, "--work", str(args.work), "--max-new-tokens", str(args.max_new_tokens),
                 "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
                 "--one", str(model), str(inputs[size]), str(out)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        row = {
            "bench": "batch_rss",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, CPU)",
            "command": command,
            "model": "tiny-deepseek-vl (random)",
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "system_prompt": "",
            **figures,
        }
        rows.append(row)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{size} records: {figures}", flush=True)

    print("\n| records | shards | seconds | records/s | peak RSS (MiB) |\n| ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['records']:,} | {row['shards']} | {row['seconds']} | {row['records_per_s']} | {row['peak_rss_mib']} |"
        )
    if len(rows) > 1:
        first, last = rows[0]["peak_rss_mib"], rows[-1]["peak_rss_mib"]
        change = (float(last) - float(first)) / float(first)  # type: ignore[arg-type]
        print(
            f"\npeak RSS {rows[-1]['records']:,} vs {rows[0]['records']:,} records: {change:+.1%} (claim: within 10%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
