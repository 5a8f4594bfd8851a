"""How long the images beside one S3 dataset object take: the validate step's cache key (a HEAD per image, no listing
answering for them) and validation (a GET per image, each opened), over a real SeaweedFS on loopback.

The input: one `train.jsonl` of `--images` records, record i naming `images/{i}.png` beside it (the same 64x64 PNG,
152 bytes). The server answers on loopback in about a millisecond; a server further away (AWS S3 from another
network, a gateway across a VPN) takes tens of milliseconds a request. `--latency-ms` rows add that wait before each
request in botocore's own `before-send` hook, as a slower network would (the request then goes to the same server).

Each tree runs in a fresh process (`--one`): this checkout, and as the same-run baseline the code at `--baseline` (a
git revision, exported with `git archive` under `--work`), which looked images up one at a time. Both must give the
same key and the same counts, checked here. Each figure is the best of `--repeats`.

    python bench/s3_images_bench.py --work /tmp/s3bench --out bench/results/s3-images-$(date +%F)-cpu.json

Prints a table; `--out` writes the rows as JSON (date, machine, command, figures).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "db90e33"  # the last commit that sent the key's HEADs and validation's GETs one at a time
BUCKET = "s3-images-bench"


def fill_bucket(client: Any, images: int) -> str:
    """The dataset object and its images; its URI."""
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    client.create_bucket(Bucket=BUCKET)
    lines = []
    for i in range(images):
        client.put_object(Bucket=BUCKET, Key=f"data/images/{i:06d}.png", Body=png.getvalue())
        turns = [
            {"from": "user", "value": f"<img>images/{i:06d}.png</img>Colour?"},
            {"from": "assistant", "value": "red"},
        ]
        lines.append(json.dumps({"conversations": turns}) + "\n")
    client.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body="".join(lines).encode())
    return f"s3://{BUCKET}/data/train.jsonl"


def run_one(uri: str, model: Path, latency_ms: float, repeats: int) -> dict[str, Any]:
    """Best-of-`repeats` seconds of the key and of validation of `uri`, in this process."""
    import vlmops
    from vlmops.config import DataConfig
    from vlmops.data.validation import validate_files
    from vlmops.fingerprints import fingerprint
    from vlmops.models.loading import load_processor
    from vlmops.storage import s3_client

    processor = load_processor(model)
    if latency_ms:
        s3_client().meta.events.register("before-send.s3", lambda **_: time.sleep(latency_ms / 1000))
    key_s, validate_s, keys, counts = [], [], set(), set()
    for _ in range(repeats):
        started = time.perf_counter()
        keys.add(fingerprint(uri, dataset=True))
        key_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            rejects = Path(scratch) / "rejects.jsonl"
            report = validate_files([uri], DataConfig(), processor.tokenizer, int(processor.num_image_tokens), rejects)
        validate_s.append(time.perf_counter() - started)
        counts.add((report.read, report.splits["all"].records, report.splits["all"].images))
    (key,) = keys
    ((read, kept, images),) = counts
    return {
        "imported_from": str(Path(vlmops.__file__).parents[1]),
        "key": key,
        "records": read,
        "kept": kept,
        "images": images,
        "key_s": round(min(key_s), 2),
        "validate_s": round(min(validate_s), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the server's data, the baseline)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--latency-ms", default="0,20", help="comma-separated waits added before each request")
    parser.add_argument("--baseline", default=BASELINE, help="git revision measured as the baseline ('' for none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--one", nargs=4, metavar=("URI", "MODEL", "LATENCY_MS", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        uri, model, latency, repeats = args.one
        print(json.dumps(run_one(uri, Path(model), float(latency), int(repeats))), flush=True)
        return 0

    sys.path.insert(0, str(ROOT))
    from bench.baseline_tree import export_tree
    from bench.results_file import write_results
    from tests.s3_server import seaweedfs_s3
    from vlmops.models.tiny import build_tiny_model

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "tiny-deepseek-vl"
    if not model.is_dir():
        build_tiny_model(model)
    trees = {"this checkout": ROOT}
    if args.baseline:
        trees = {f"baseline {args.baseline}": export_tree(args.baseline, args.work), **trees}
    rows = []
    with seaweedfs_s3(args.work / f"seaweedfs-{os.getpid()}") as server:
        uri = fill_bucket(server.client(), args.images)
        for latency in [float(n) for n in args.latency_ms.split(",")]:
            for name, tree in trees.items():
                env = {**os.environ, **server.env(), "PYTHONPATH": str(tree)}
                child = [sys.executable, __file__, "--work", str(args.work), "--one", uri, str(model)]
                child += [str(latency), str(args.repeats)]
                done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                row = {"code": name, "latency_ms": latency, **figures}
                rows.append(row)
                print(json.dumps(row), flush=True)
            mine = [r for r in rows if r["latency_ms"] == latency]
            if len({(r["key"], r["records"], r["kept"], r["images"]) for r in mine}) != 1:
                raise SystemExit(f"the trees differ at {latency} ms: {mine}")

    print("\n| code | added latency (ms) | images | key (s) | validation (s) |\n| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['code']} | {row['latency_ms']:g} | {row['images']:,} | {row['key_s']} | {row['validate_s']} |")
    if args.out:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({platform.node()}, CPU)"
        write_results(args.out, machine, rows, python=platform.python_version(), repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
