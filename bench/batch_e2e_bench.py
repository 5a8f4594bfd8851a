"""End-to-end batch inference through `vlmops batch-infer`: image files on disk to answers on disk.

For each model a random-initialised checkpoint with the released architecture is written to disk, with N
prompts (one PNG or JPEG photo-sized image each, ~30 text tokens) as a jsonl file; then the real command
runs in a child process, as a user would run it: read, decode, preprocess, vision, prefill, decode, write.
The default engine at any job size (`infer.engine: auto` with `infer.fast_min_records=0`: the fast one on CUDA) and
the plain `generate` engine
(`infer.engine=plain`, batch 32: the baseline, on fewer prompts, one batch a shard) run in the same call on the
same files. Compare steady with steady: the baseline's whole-command rate over a few batches is mostly its start-up.

images/s = records answered / wall time of the command (model loading included: it is what a job pays);
gpu busy = share of nvidia-smi's 100 ms samples that saw the GPU busy while the command ran; 1st part s =
seconds from launch until the first shard's part was published (start-up: load, hash, compile, capture, plus
that shard); steady img/s = the records of the later shards / the time between the first and the last part;
start-up s (load s, engine s) = what the command itself reports: the seconds before its first shard began (of them,
loading the model and building the engine); the rest of "1st part s" is the first shard, compiling and capturing.
compile cache = torch.compile's cache (`model.compile_cache`, a folder under --work emptied when a model's cases
begin) as the run found it: "empty" is a fresh machine's first job; "filled" (`--again`: the default engine once more)
a later job on a machine that keeps the folder; "shared file" (`--again shared`: every run also sets
`model.shared_compile_cache` to a folder under --work, and the local cache is emptied before the second run) a fresh
machine of a fleet that shares the artifacts the first run published. slots x tokens = the fast engine's K/V slots and
the tokens each holds, as the command logged them (sized to the job's longest prompt unless `infer.max_context` is set).

    python bench/batch_e2e_bench.py --models 1.3b,7b --out bench/results/batch-e2e-DATE.json
    python bench/batch_e2e_bench.py --size tiny --models 1.3b --records 8 --plain-records 4   # CPU smoke
    python bench/batch_e2e_bench.py --models 1.3b --set infer.decode_window=8   # + a run with that setting
    python bench/batch_e2e_bench.py --models 7b --records 7b=3000 --again   # + a run with the compile cache filled
    python bench/batch_e2e_bench.py --models 7b --records 7b=3000 --again shared   # + a fresh machine of a fleet
    python bench/batch_e2e_bench.py --models 1.3b --set infer.temperature=0.7 --set infer.top_p=0.9   # + sampled
                                                                                  # (the plain baseline sampled too)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from infer_bench import build_random, random_images  # noqa: E402

SAMPLING = {"infer.temperature", "infer.top_p", "infer.top_k", "infer.repetition_penalty"}
"""`--set` keys that change how tokens are picked: the plain baseline also runs with them."""


def write_inputs(folder: Path, count: int) -> Path:
    """`count` simple records, each naming one image file (PNG and JPEG alternate, 16 distinct pictures)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for index, image in enumerate(random_images(16, seed=5)):
        name = f"{index}.jpg" if index % 2 else f"{index}.png"
        image.save(images / name)
        names.append(name)
    prompts = folder / "prompts.jsonl"
    with prompts.open("w") as f:
        for index in range(count):
            query = f"<img>images/{names[index % len(names)]}</img>Describe every object in this picture, {index}."
            f.write(json.dumps({"id": f"p{index}", "query": query}) + "\n")
    return prompts


class GpuSampler:
    """nvidia-smi's utilisation every 100 ms while a command runs (None where there is no nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line.strip()))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def busy(self) -> float | None:
        return round(sum(1 for s in self.samples if s > 0) / len(self.samples), 3) if self.samples else None


def startup_figures(output: str) -> dict[str, float]:
    """What the command said about its start-up: the summary's seconds before the first shard, the log's model
    load and engine build, and the fast engine's slots and their tokens (absent where it ran no shard or logged
    less)."""
    patterns = {
        "startup_s": r"start-up +([\d.]+) s before the first shard",
        "load_s": r"model loaded in ([\d.]+) s",
        "engine_build_s": r"Engine built in ([\d.]+) s",
        "slots": r"FastEngine: (\d+) slots of \d+ tokens",
        "slot_tokens": r"FastEngine: \d+ slots of (\d+) tokens",
    }
    found = {key: re.search(pattern, output) for key, pattern in patterns.items()}
    return {key: float(match.group(1)) for key, match in found.items() if match}


def run_job(
    model: Path, prompts: Path, out: Path, sets: list[str], limit: int | None, wrap: list[str] | None = None
) -> dict[str, Any]:
    if limit is not None:
        head = prompts.with_name(f"prompts-{limit}.jsonl")
        head.write_text("".join(prompts.read_text().splitlines(keepends=True)[:limit]))
        prompts = head
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        *(wrap or []),
        sys.executable,
        "-m",
        "vlmops.cli",
        "batch-infer",
        "--model",
        str(model),
        "--input",
        str(prompts),
    ]
    cmd += ["--output", str(out), "--config", str(ROOT / "pipeline.yaml")]
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    launched = time.time()
    with GpuSampler() as gpu:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(line) for part in manifest["parts"] for line in (out / part["name"]).read_text().splitlines()]
    tokens = sum(r["generated_tokens"] for r in records)
    # Each part is published when its shard ends: from the first part on, the job runs at its steady rate
    # (the model loaded, hashed, compiled and its graphs captured before then).
    parts = sorted((out / part["name"]).stat().st_mtime for part in manifest["parts"])
    first = manifest["parts"][0]["records"] if manifest["parts"] else 0
    steady = (len(records) - first) / (parts[-1] - parts[0]) if len(parts) > 1 and parts[-1] > parts[0] else None
    return {
        **startup_figures(proc.stdout + proc.stderr),
        "records": len(records),
        "rejects": sum(1 for _ in (out / "rejects.jsonl").open()) if (out / "rejects.jsonl").exists() else 0,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(records) / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "mean_answer_tokens": round(tokens / max(len(records), 1), 1),
        "gpu_busy": gpu.busy(),
        "first_part_s": round(parts[0] - launched, 2) if parts else None,
        "steady_images_per_s": round(steady, 2) if steady is not None else None,
        "settings": sets,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.3b,7b")
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--records", default="1.3b=6000,7b=1600", help="prompts per model for the default engine")
    parser.add_argument(
        "--plain-records", type=int, default=128, help="prompts for the plain generate baseline (0: skip it)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--shards", type=int, default=8, help="shards per job: the steady rate is read from them")
    parser.add_argument("--work", default="/tmp/batch-e2e")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for an extra run of the default engine (repeatable), e.g. infer.decode_window=8",
    )
    parser.add_argument(
        "--again",
        nargs="?",
        const="local",
        choices=["local", "shared"],
        help="run the default engine a second time: with torch.compile's local cache filled (local, the default), or "
        "with it emptied and the first run's artifacts in model.shared_compile_cache (shared)",
    )
    parser.add_argument(
        "--py-spy",
        default=None,
        metavar="DIR",
        help="also run the default engine on a third of the prompts under py-spy (on PATH); "
        "the raw stacks go to DIR and the busiest frames are printed",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counts = dict(item.split("=") for item in args.records.split(",")) if "=" in args.records else {}
    rows: list[dict[str, Any]] = []
    for arch in args.models.split(","):
        work = Path(args.work) / arch
        model = work / "model"
        if not (model / "config.json").is_file():
            loaded = build_random(arch, args.size, work, device)
            loaded.model.save_pretrained(model)
            loaded.processor.save_pretrained(model)
            del loaded
            torch.cuda.empty_cache() if device == "cuda" else None
        count = int(counts.get(arch, args.records if "=" not in args.records else 64))
        prompts = write_inputs(work / "inputs", count)
        shard = max(1, count // args.shards)
        compile_cache, shared_cache = work / "compile-cache", work / "shared-compile-cache"
        shutil.rmtree(compile_cache, ignore_errors=True)
        shutil.rmtree(shared_cache, ignore_errors=True)
        base = [
            f"infer.max_new_tokens={args.new_tokens}",
            "model.system_prompt=",
            f"infer.shard_size={shard}",
            f"model.compile_cache={compile_cache}",
            *([f"model.shared_compile_cache={shared_cache}"] if args.again == "shared" else []),
        ]
        # `auto` at any job size (the fast engine on CUDA, as in earlier rows; plain on the CPU): by default it takes
        # plain generate below infer.fast_min_records records, which this benchmark measures against.
        fast = [*base, "infer.fast_min_records=0"]
        cases: list[tuple[str, list[str], int | None, list[str] | None]] = [
            ("batch-infer (auto engine)", fast, None, None)
        ]
        if args.again:
            cases.append(("batch-infer (auto engine) again", fast, None, None))
        if args.set:
            cases.append((f"batch-infer (auto engine, {' '.join(args.set)})", [*fast, *args.set], None, None))
        if args.plain_records > 0:
            # Shards of one batch: the baseline's steady rate is read from its later parts, past the first call's
            # first-use costs (towers compiled, kernels chosen), as the default engine's is.
            plain = [*base, "infer.engine=plain", "infer.batch_size=32", "infer.shard_size=32"]
            cases.append(("batch-infer plain generate", plain, args.plain_records, None))
            if any(item.partition("=")[0] in SAMPLING for item in args.set):  # the sampled run's own baseline
                sets = " ".join(args.set)
                cases.append((f"batch-infer plain generate ({sets})", [*plain, *args.set], args.plain_records, None))
        if args.py_spy:
            stacks = Path(args.py_spy) / f"{arch}.txt"
            stacks.parent.mkdir(parents=True, exist_ok=True)
            spy = ["py-spy", "record", "--idle", "--threads", "--format", "raw", "-r", "50", "-o", str(stacks), "--"]
            cases.append(("batch-infer (auto) under py-spy", base, max(1, count // 3), spy))
        for case, sets, limit, wrap in cases:
            if args.again == "shared" and case.endswith(" again"):
                shutil.rmtree(compile_cache, ignore_errors=True)  # a fresh machine: only the shared file carries over
            cache = "filled" if compile_cache.is_dir() and any(compile_cache.iterdir()) else "empty"
            if cache == "empty" and shared_cache.is_dir() and any(shared_cache.iterdir()):
                cache = "shared file"
            try:
                row = {
                    "model": arch,
                    "case": case,
                    "compile_cache": cache,
                    **run_job(model, prompts, work / "out", sets, limit, wrap),
                }
                if wrap:
                    print(busiest_frames(stacks), flush=True)
            except Exception as err:  # one failed case must not lose the rows already measured
                row = {"model": arch, "case": case, "error": str(err)[-2000:]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(args, rows)
    print(
        f"\n{'model':6} {'case':32} {'records':>8} {'s':>8} {'images/s':>9} {'tokens/s':>9} {'gpu busy':>9} "
        f"{'1st part s':>10} {'steady img/s':>12} {'start-up s':>10} {'load s':>7} {'engine s':>8} "
        f"{'compile cache':>13} {'slots x tokens':>14}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6} {r['case']:32} error: {r['error'][:80]}")
            continue
        busy = "-" if r["gpu_busy"] is None else f"{r['gpu_busy']:.0%}"
        print(
            f"{r['model']:6} {r['case']:32} {r['records']:>8} {r['seconds']:>8} {r['images_per_s']:>9} "
            f"{r['tokens_per_s']:>9} {busy:>9} {r['first_part_s']!s:>10} {r['steady_images_per_s']!s:>12} "
            f"{r.get('startup_s', '-')!s:>10} {r.get('load_s', '-')!s:>7} {r.get('engine_build_s', '-')!s:>8} "
            f"{r.get('compile_cache', '-'):>13} {_slots(r):>14}"
        )
    return 0


def _slots(row: dict[str, Any]) -> str:
    return f"{row['slots']:g} x {row['slot_tokens']:g}" if "slots" in row and "slot_tokens" in row else "-"


def busiest_frames(stacks: Path, top: int = 18) -> str:
    """Per thread of a py-spy raw profile: its samples, the frames it spent them in (self) and under (total)."""
    threads: dict[str, dict[str, Any]] = {}
    for line in stacks.read_text().splitlines():
        path, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = path.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "?")
        frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        entry = threads.setdefault(thread, {"samples": 0, "self": {}, "total": {}})
        entry["samples"] += int(count)
        if frames:
            entry["self"][frames[-1]] = entry["self"].get(frames[-1], 0) + int(count)
        for frame in set(frames):
            entry["total"][frame] = entry["total"].get(frame, 0) + int(count)
    lines = [f"py-spy {stacks}:"]
    for thread, entry in sorted(threads.items(), key=lambda t: -t[1]["samples"])[:6]:
        lines.append(f"  {thread}: {entry['samples']} samples")
        for kind in ("self", "total"):
            ranked = sorted(entry[kind].items(), key=lambda kv: -kv[1])[:top]
            lines += [f"    {kind:5} {n / entry['samples']:6.1%}  {frame[:150]}" for frame, n in ranked]
    return "\n".join(lines)


def save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if not args.out:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    doc = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "gpu": gpu, "cpus": os.cpu_count()},
        "command": " ".join(sys.argv),
        "versions": {"torch": torch.__version__},
        "rows": rows,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
