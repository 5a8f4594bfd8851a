"""`vlmops convert SRC DST`: an original-release DeepSeek-VL checkpoint to transformers' native layout."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an original-layout DeepSeek-VL checkpoint to transformers")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.models.convert import convert_command

    return convert_command(args.src, args.dst)
