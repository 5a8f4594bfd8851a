"""`vlmops convert SRC DST`: an original-release DeepSeek-VL checkpoint to transformers' native layout."""

from __future__ import annotations

import argparse
import re
from collections import Counter

from vlmops.plural import counted


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an original-layout DeepSeek-VL checkpoint to transformers")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin weights too (unpickling can run code: only for a source you trust)",
    )
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.models.convert import convert_checkpoint
    from vlmops.models.diskspace import gb

    report = convert_checkpoint(args.src, args.dst, allow_pickle=args.allow_pickle)
    # Dropped keys grouped by family: "vision_model.vision_tower.attn_pool.q x1", not one line per layer.
    dropped = Counter(re.sub(r"\.\d+\.", ".N.", k).rsplit(".", 1)[0] for k in report.dropped)
    groups = ", ".join(f"{k} x{n}" for k, n in sorted(dropped.items())) or "none"
    print(f"converted {report.src} -> {report.dst} ({report.arch})")
    print(
        f"  tensors: {report.tensors_in} read, {report.tensors_out} written "
        f"in {counted(report.shards, 'shard')}, {gb(report.bytes_written)}"
    )
    print(f"  dropped: {len(report.dropped)} ({groups})")
    print(f"  time:    {report.seconds:.1f}s")
    return 0
