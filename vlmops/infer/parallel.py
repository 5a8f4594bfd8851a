"""Batch inference split across the GPUs of one machine: one worker process per GPU.

Each worker sees one GPU (`CUDA_VISIBLE_DEVICES`), loads the model once and predicts its share of the
records (dealt out in length order, so every worker gets a similar mix); the shares are then merged into
one predictions file in input order, checking that every record appears exactly once. Workers need no
collective communication, so no NCCL; NVLink multicast is switched off in their environment all the same.

    python -m vlmops.infer.parallel --model DIR --dataset eval.jsonl --out predictions.jsonl --workers 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlmops.config import PipelineConfig, dump_config, load_config
from vlmops.data.formats import read_dataset
from vlmops.infer.batch import BatchResult, batch_infer, write_jsonl_atomic
from vlmops.multigpu import NO_MULTICAST_ENV

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Every visible GPU; one process on a machine without CUDA."""
    return max(torch.cuda.device_count(), 1)


def parallel_batch_infer(
    model_path: str | os.PathLike[str],
    dataset_file: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    config: PipelineConfig,
    workers: int | None = None,
) -> BatchResult:
    """Predict every record of `dataset_file` with `workers` processes (one per GPU); merge into `out_file`."""
    count = workers or default_workers()
    out_path = Path(out_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    if gpus and count > gpus:
        raise ValueError(f"{count} inference workers asked for but only {gpus} GPU(s) are visible")
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(dump_config(config))
        started = time.perf_counter()
        procs = []
        for rank in range(count):
            env = {**os.environ, **NO_MULTICAST_ENV}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = _visible_device(rank)
            cmd = [
                sys.executable, "-m", "vlmops.infer.parallel", "--model", str(model_path), "--dataset",
                str(dataset_file), "--out", str(Path(tmp) / f"shard-{rank}.jsonl"), "--config", str(config_file),
                "--rank", str(rank), "--workers", str(count),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"batch inference workers failed (exit codes {codes}); see their output above")
        seconds = time.perf_counter() - started
        expected = len(read_dataset(dataset_file).conversations)
        records, tokens = merge_shards([Path(tmp) / f"shard-{rank}.jsonl" for rank in range(count)], expected)
        write_jsonl_atomic(out_path, records)
    log.info(
        "%d workers predicted %d records in %.1f s (%.1f tokens/s)", count, len(records), seconds, tokens / seconds
    )
    return BatchResult(out_path, len(records), seconds, tokens, tokens / seconds if seconds else 0.0)


def merge_shards(shards: list[Path], expected: int) -> tuple[list[dict[str, object]], int]:
    """All records of the shard files in input order; every index 0..expected-1 exactly once, or an error."""
    by_index: dict[int, dict[str, object]] = {}
    for shard in shards:
        for line in shard.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            index = int(record["index"])
            if index in by_index:
                raise RuntimeError(f"record {index} was predicted twice ({shard})")
            by_index[index] = record
    missing = sorted(set(range(expected)) - set(by_index))
    extra = sorted(set(by_index) - set(range(expected)))
    if missing or extra:
        raise RuntimeError(f"merged predictions do not match the dataset: missing {missing[:10]}, unknown {extra[:10]}")
    records = [by_index[i] for i in range(expected)]
    return records, sum(int(r.get("generated_tokens", 0)) for r in records)  # type: ignore[call-overload]


def _visible_device(rank: int) -> str:
    """The rank-th GPU of those this process may use (respects an outer CUDA_VISIBLE_DEVICES)."""
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    return outer.split(",")[rank] if outer else str(rank)


def _worker(args: argparse.Namespace) -> int:
    from vlmops.models.loading import load_model

    config = load_config(args.config)
    loaded = load_model(args.model, dtype=config.model.dtype, attn=config.model.attn)
    batch_infer(
        loaded,
        args.dataset,
        args.out,
        config.infer,
        system_prompt=config.model.system_prompt,
        storage=config.storage,
        shard=(args.rank, args.workers),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmops.infer.parallel", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="native checkpoint folder (e.g. a merged model)")
    parser.add_argument("--dataset", required=True, help="jsonl in the conversations format")
    parser.add_argument("--out", required=True, help="predictions jsonl")
    parser.add_argument("--config", help="pipeline config (infer and model sections are used)")
    parser.add_argument("--workers", type=int, help="processes, one per GPU (default: every visible GPU)")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rank is not None:
        return _worker(args)
    result = parallel_batch_infer(args.model, args.dataset, args.out, load_config(args.config), args.workers)
    print(f"{result.count} predictions in {result.seconds:.1f} s ({result.tokens_per_s:.1f} tokens/s) -> {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
