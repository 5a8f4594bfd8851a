"""`vlmops demo-data OUT`: the synthetic coloured-shapes dataset the embedded default trains on."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write the synthetic demo dataset (conversations jsonl + PNGs)")
    p.add_argument("out", type=Path)
    p.add_argument("--num-train", type=int, default=320)
    p.add_argument("--num-eval", type=int, default=40)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.data.demo import write_demo_dataset

    train, evals = write_demo_dataset(args.out, args.num_train, args.num_eval, args.image_size, args.seed)
    print(f"wrote {train} and {evals}")
    return 0
