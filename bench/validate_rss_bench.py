"""Peak memory of `vlmops validate PATH` as its input grows: it must stay flat (records are streamed).

Each size runs as a fresh process (`--one`): one `validate_files` (the code path of `vlmops validate PATH`)
over a jsonl of that many distinct records, with the tiny DeepSeek-VL's tokenizer and processor (CPU). Records
have one or two turns; one in a hundred carries a small PNG (opened and checked like any image). It reports
the resident memory before validation (imports and processor loaded) and the peak during it: the kernel's
high-water mark (VmHWM) is reset just before validation starts (`/proc/self/clear_refs`), because the
process's lifetime peak (ru_maxrss, also reported) is set while importing and would hide any growth. The
claim: the peak during validation at the largest size is within 10% of the one at the smallest. The
baseline, in the same call: the same files parsed whole into memory with `read_dataset` (what validation did
before it streamed), which grows with the input.

    python bench/validate_rss_bench.py --work /tmp/vbench --sizes 10000,100000
    python bench/validate_rss_bench.py --work /tmp/vbench --sizes 10000,100000 --format json   # one list

Prints a table and appends one JSON row per size and mode to bench/results/validate_rss.jsonl (date, machine,
command, figures).
"""

from __future__ import annotations

import argparse
import gc
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
RESULTS = ROOT / "bench" / "results" / "validate_rss.jsonl"
IMAGE_EVERY = 100


def write_records(path: Path, count: int) -> None:
    """`count` distinct records (seed format); every IMAGE_EVERY-th asks about images/shape.png. A `.json` path
    gets one list (an item per line), a `.jsonl` path a record per line."""
    as_list = path.suffix == ".json"
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n" if as_list else "")
        for i in range(count):
            question = f"Record {i}: what is in the picture, and why does it matter for item {i % 97}?"
            if i % IMAGE_EVERY == 0:
                question = "<img>images/shape.png</img>" + question
            turns = [{"from": "user", "value": question}, {"from": "assistant", "value": f"Answer number {i}."}]
            if i % 3 == 0:
                turns += [{"from": "user", "value": "And then?"}, {"from": "assistant", "value": "Nothing more."}]
            separator = ("," if i < count - 1 else "") if as_list else ""
            f.write(json.dumps({"id": i, "conversations": turns}) + separator + "\n")
        f.write("]\n" if as_list else "")


def prepare(work: Path, sizes: list[int], suffix: str) -> tuple[Path, dict[int, Path]]:
    import random

    from vlmops.data.demo import draw_shape
    from vlmops.models.tiny import build_tiny_model

    model = work / "tiny"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "deepseek_vl", seed=0)
    (work / "images").mkdir(parents=True, exist_ok=True)
    image = work / "images" / "shape.png"
    if not image.is_file():
        draw_shape("red", "circle", 64, random.Random(0)).save(image)
    inputs = {}
    for size in sizes:
        inputs[size] = work / f"records-{size}{suffix}"
        if not inputs[size].is_file():
            write_records(inputs[size], size)
    return model, inputs


def run_one(mode: str, model: str, records: str, rejects: str) -> dict[str, object]:
    """One validation (or the in-memory baseline) in this process; its figures and this process's peak RSS."""
    from transformers import AutoProcessor

    from bench.host_memory import reset_peak, status_kib
    from vlmops.config import DataConfig

    processor = AutoProcessor.from_pretrained(model)
    gc.collect()
    before_kib = reset_peak()
    started = time.perf_counter()
    if mode == "stream":
        from vlmops.data.validation import validate_files

        report = validate_files(
            [records], DataConfig(max_length=4096), processor.tokenizer, int(processor.num_image_tokens), Path(rejects)
        )
        figures: dict[str, object] = {
            "records": report.read,
            "kept": report.splits["all"].records,
            "rejected": report.rejected_count,
            "images": report.splits["all"].images,
            "tokens_max": report.splits["all"].tokens_max,
        }
    else:
        from vlmops.data.formats import read_dataset

        read = read_dataset(records)
        figures = {"records": len(read.conversations) + len(read.problems), "kept": len(read.conversations)}
    seconds = time.perf_counter() - started
    peak_kib = status_kib("VmHWM")
    return {
        **figures,
        "seconds": round(seconds, 1),
        "records_per_s": round(int(figures["records"]) / seconds, 1),  # type: ignore[call-overload]
        "rss_before_mib": round(before_kib / 1024, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "growth_mib": round((peak_kib - before_kib) / 1024, 1),
        "process_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (model, inputs, rejects)")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated record counts")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-memory read_dataset rows")
    parser.add_argument("--format", choices=["jsonl", "json"], default="jsonl", help="a line per record, or one list")
    parser.add_argument("--one", nargs=4, metavar=("MODE", "MODEL", "RECORDS", "REJECTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)), flush=True)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    model, inputs = prepare(args.work, sizes, f".{args.format}")
    command = "python bench/validate_rss_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    modes = ["stream"] if args.no_baseline else ["stream", "in-memory"]
    rows = []
    for mode in modes:
        for size in sizes:
            child = [sys.executable, __file__, "--work", str(args.work),
                     "--one", mode, str(model), str(inputs[size]), str(args.work / f"rejects-{size}.jsonl")]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            row = {
                "bench": "validate_rss",
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, CPU)",
                "command": command,
                "model": "tiny-deepseek-vl (random)",
                "mode": mode,
                "format": args.format,
                "input_mib": round(inputs[size].stat().st_size / 2**20, 1),
                **figures,
            }
            rows.append(row)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with RESULTS.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{mode} {size} records: {figures}", flush=True)

    print(
        "\n| mode | records | input (MiB) | seconds | records/s | RSS before (MiB) | peak RSS during (MiB) | growth (MiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['mode']} | {row['records']:,} | {row['input_mib']} | {row['seconds']} | {row['records_per_s']} "
            f"| {row['rss_before_mib']} | {row['peak_rss_mib']} | {row['growth_mib']} |"
        )
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        if len(mine) > 1:
            first, last = float(mine[0]["peak_rss_mib"]), float(mine[-1]["peak_rss_mib"])
            print(
                f"\n{mode}: peak RSS {mine[-1]['records']:,} vs {mine[0]['records']:,} records: {last / first - 1:+.1%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
