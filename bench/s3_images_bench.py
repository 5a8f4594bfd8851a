"""How long a dataset's downloaded images take: the validate step's cache key and validation, for images beside one
S3 dataset object (a HEAD per image for the key, no listing answering for them; a GET per image, each opened, for
validation) over a real SeaweedFS on loopback, and for images a local dataset names by http URL (validation's GET per
image; the key does not look at URLs) from a real HTTP server on loopback (tests/image_server.py).

The input: `--images` records, record i naming image i (the same 64x64 PNG, 152 bytes; `images/{i}.png` beside the S3
object, `http://127.0.0.1:PORT/paced.png?n={i}` for http). The servers answer on loopback in about a millisecond; a
server further away (AWS S3 from another network, a gateway across a VPN, an image host) takes tens of milliseconds a
request. `--latency-ms` rows add that wait before each request: in botocore's own `before-send` hook for S3, as a
slower network would (the request then goes to the same server), in the HTTP server before it answers for http.

Each tree runs in a fresh process (`--one`): this checkout, and as the same-run baseline the code at the source's
baseline (`--baseline` for S3, `--http-baseline` for http: git revisions, exported with `git archive` under `--work`),
which fetched images one at a time. Both must give the same key and the same counts, checked here. Each figure is the
best of `--repeats`.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "db90e33"  # the last commit that sent the key's HEADs and validation's GETs one at a time
HTTP_BASELINE = "8e4ba47"  # the last commit whose validation fetched images by URL one at a time
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


def url_dataset(folder: Path, server_url: str, images: int) -> Path:
    """A local dataset file whose record i names image i by URL; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = folder / "train.jsonl"
    with dataset.open("w") as out:
        for i in range(images):
            turns = [
                {"from": "user", "value": f"<img>{server_url}/paced.png?n={i}</img>Colour?"},
                {"from": "assistant", "value": "blue"},
            ]
            out.write(json.dumps({"conversations": turns}) + "\n")
    return dataset


def run_one(uri: str, model: Path, latency_ms: float, repeats: int) -> dict[str, Any]:
    """Best-of-`repeats` seconds of the key and of validation of `uri` (an s3:// object, or a local file of URL
    images), in this process."""
    import vlmops
    from vlmops.config import DataConfig, StorageConfig
    from vlmops.data.validation import validate_files
    from vlmops.fingerprints import fingerprint
    from vlmops.models.loading import load_processor
    from vlmops.storage import s3_client

    sys.path.append(str(ROOT))  # after the tree under test: its vlmops stays the one imported above
    from bench.baseline_tree import tree_name

    processor = load_processor(model)
    storage = None if uri.startswith("s3://") else StorageConfig(url_allow_networks=["127.0.0.1/32"])
    if latency_ms and storage is None:
        s3_client().meta.events.register("before-send.s3", lambda **_: time.sleep(latency_ms / 1000))
    key_s, validate_s, keys, counts = [], [], set(), set()
    for _ in range(repeats):
        started = time.perf_counter()
        keys.add(fingerprint(uri, dataset=True))
        key_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            rejects = Path(scratch) / "rejects.jsonl"
            tokens = int(processor.num_image_tokens)
            report = validate_files([uri], DataConfig(), processor.tokenizer, tokens, rejects, storage=storage)
        validate_s.append(time.perf_counter() - started)
        counts.add((report.read, report.splits["all"].records, report.splits["all"].images))
    (key,) = keys
    ((read, kept, images),) = counts
    return {
        "imported_from": tree_name(Path(vlmops.__file__).parents[1]),
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
    parser.add_argument("--sources", default="s3,http", help="comma-separated: s3, http")
    parser.add_argument("--baseline", default=BASELINE, help="S3's baseline git revision ('' for none)")
    parser.add_argument("--http-baseline", default=HTTP_BASELINE, help="http's baseline git revision ('' for none)")
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
    from tests.image_server import serving_images
    from tests.s3_server import seaweedfs_s3
    from vlmops.models.tiny import build_tiny_model

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "tiny-deepseek-vl"
    if not model.is_dir():
        build_tiny_model(model)
    rows: list[dict[str, Any]] = []

    def measure(source: str, uri: str, baseline: str, env: dict[str, str], pace: Callable[[float], None]) -> None:
        trees = {"this checkout": ROOT}
        if baseline:
            trees = {f"baseline {baseline}": export_tree(baseline, args.work), **trees}
        for latency in [float(n) for n in args.latency_ms.split(",")]:
            pace(latency)
            for name, tree in trees.items():
                child = [sys.executable, __file__, "--work", str(args.work), "--one", uri, str(model)]
                child += [str(latency), str(args.repeats)]
                done = subprocess.run(
                    child,
                    env={**os.environ, **env, "PYTHONPATH": str(tree)},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                row = {"source": source, "code": name, "latency_ms": latency, **figures}
                rows.append(row)
                print(json.dumps(row), flush=True)
            mine = [r for r in rows if (r["source"], r["latency_ms"]) == (source, latency)]
            if len({(r["key"], r["records"], r["kept"], r["images"]) for r in mine}) != 1:
                raise SystemExit(f"the trees differ for {source} at {latency} ms: {mine}")

    sources = set(args.sources.split(","))
    if "s3" in sources:
        with seaweedfs_s3(args.work / f"seaweedfs-{os.getpid()}") as server:
            uri = fill_bucket(server.client(), args.images)
            measure("s3", uri, args.baseline, server.env(), lambda _: None)  # the child adds S3's latency
    if "http" in sources:
        with serving_images() as images:

            def pace(latency_ms: float) -> None:
                images.pace_s = latency_ms / 1000

            dataset = url_dataset(args.work / "url-dataset", images.url, args.images)
            measure("http", str(dataset), args.http_baseline, {}, pace)

    print(
        "\n| source | code | added latency (ms) | images | key (s) | validation (s) |\n"
        "| --- | --- | ---: | ---: | ---: | ---: |"
    )
    for row in rows:
        print(
            f"| {row['source']} | {row['code']} | {row['latency_ms']:g} | {row['images']:,} | {row['key_s']} | "
            f"{row['validate_s']} |"
        )
    if args.out:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({platform.node()}, CPU)"
        write_results(args.out, machine, rows, python=platform.python_version(), repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
