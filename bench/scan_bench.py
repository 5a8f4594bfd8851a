"""How long one scan of a dataset file takes: the validate step's cache key
(`vlmops.fingerprints.dataset_fingerprint`, computed on every run, cached or not) and `iter_dataset` alone
(validation's reading of the file, which the key repeats), over a jsonl of many records naming a few images.

The input: `--records` records (seed format, ~250 bytes each), record i naming `images/img-{i % N}.png` for each N
in `--images` (1,000: a file naming the same images over and over; as many as records: no image named twice). The
image files exist (a byte each: the key stats them, nothing here opens them).

Each tree runs in a fresh process (`--one`): this checkout, and as the same-run baseline the code at `--baseline`
(a git revision, exported with `git archive` under `--work`). Both must give the same key, checked here. Each figure
is the best of `--repeats`; the memory column is the growth of the resident set during them (the kernel's
high-water mark, reset first), for what the scan holds beyond one record.

    python bench/scan_bench.py --work /tmp/scanbench --out bench/results/scan-$(date +%F)-cpu.json

Prints a table; `--out` writes the rows as JSON (date, machine, command, figures).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "2237bab"  # the last commit that resolved every image reference of a scan anew


def write_records(path: Path, count: int, images: int) -> None:
    """`count` distinct records, record i naming images/img-{i % images}.png; the image files too."""
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    for j in range(images):
        image = path.parent / "images" / f"img-{j:06d}.png"
        if not image.is_file():
            image.write_bytes(b"x")
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            question = f"<img>images/img-{i % images:06d}.png</img>Record {i}: what is in the picture, and why?"
            turns = [
                {"from": "user", "value": question},
                {"from": "assistant", "value": f"Answer number {i}, with a few more words to read."},
            ]
            f.write(json.dumps({"id": i, "conversations": turns}) + "\n")


def key_function() -> Callable[[Path], str]:
    """`dataset_fingerprint` from the tree under test: in vlmops.fingerprints, or tasks.caching in a baseline from
    before the key moved into the core."""
    try:
        return importlib.import_module("vlmops.fingerprints").dataset_fingerprint
    except ModuleNotFoundError as err:
        if err.name != "vlmops.fingerprints":
            raise
        return importlib.import_module("tasks.caching").dataset_fingerprint


def run_one(file: Path, repeats: int) -> dict[str, object]:
    """Best-of-`repeats` seconds of the key and of iter_dataset over `file`, in this process."""
    import vlmops
    from vlmops.data.formats import iter_dataset

    dataset_fingerprint = key_function()

    sys.path.append(str(ROOT))  # after the tree under test: its vlmops stays the one imported above
    from bench.baseline_tree import tree_name
    from bench.host_memory import reset_peak, status_kib

    before_kib = reset_peak()
    key_s, iter_s, keys, records = [], [], set(), 0
    for _ in range(repeats):
        started = time.perf_counter()
        keys.add(dataset_fingerprint(file))
        key_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        records = sum(1 for _ in iter_dataset(file))
        iter_s.append(time.perf_counter() - started)
    (key,) = keys
    return {
        "imported_from": tree_name(Path(vlmops.__file__).parents[1]),
        "records": records,
        "key": key,
        "key_s": round(min(key_s), 2),
        "iter_dataset_s": round(min(iter_s), 2),
        "growth_mib": round((status_kib("VmHWM") - before_kib) / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (inputs, the baseline's code)")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--images", default="1000,100000", help="comma-separated counts of distinct images named")
    parser.add_argument("--baseline", default=BASELINE, help="git revision measured as the baseline ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--one", nargs=2, metavar=("FILE", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), int(args.one[1]))), flush=True)
        return 0

    sys.path.insert(0, str(ROOT))
    from bench.baseline_tree import export_tree
    from bench.results_file import write_results

    args.work.mkdir(parents=True, exist_ok=True)
    trees = {"this checkout": ROOT}
    if args.baseline:
        trees = {f"baseline {args.baseline}": export_tree(args.baseline, args.work), **trees}
    rows = []
    for images in [int(n) for n in args.images.split(",")]:
        file = args.work / f"records-{args.records}-{images}.jsonl"
        if not file.is_file():
            write_records(file, args.records, images)
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree)}
            child = [sys.executable, __file__, "--work", str(args.work), "--one", str(file), str(args.repeats)]
            done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            row = {
                "code": name,
                "distinct_images": images,
                "input_mib": round(file.stat().st_size / 2**20, 1),
                **figures,
                "records_per_s": round(figures["records"] / figures["key_s"]),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        mine = [r for r in rows if r["distinct_images"] == images]
        if len({r["key"] for r in mine}) != 1:
            raise SystemExit(f"the keys differ between the trees for {file}: {[r['key'] for r in mine]}")

    print("\n| code | records | distinct images | input (MiB) | key (s) | iter_dataset (s) | records/s (key) |", end="")
    print(" growth (MiB) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['code']} | {row['records']:,} | {row['distinct_images']:,} | {row['input_mib']} | {row['key_s']} "
            f"| {row['iter_dataset_s']} | {row['records_per_s']:,} | {row['growth_mib']} |"
        )
    if args.out:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({platform.node()}, CPU)"
        write_results(args.out, machine, rows, python=platform.python_version(), repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
