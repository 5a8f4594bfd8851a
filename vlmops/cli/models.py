"""`vlmops models`: the model catalog."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model catalog")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.models.catalog import CATALOG, MEMORY_NOTES

    rows = [("name", "arch", "source", "id", "params", "infer bf16", "LoRA SFT", "full SFT")]
    for e in CATALOG.values():
        rows.append(
            (
                e.name,
                e.arch,
                e.default_source,
                e.hub_id(e.default_source) or "built on demand",
                f"{e.params / 1e9:.2f}B" if e.params else "tiny",
                f"{e.inference_bf16_gib:g} GiB",
                f"{e.lora_sft_gib:g} GiB",
                f"{e.full_sft_gib_per_gpu:g} GiB x{e.full_sft_gpus}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"\nGPU memory per GPU: {MEMORY_NOTES}.")
    print("The HF hub has transformers-native copies: model.source: huggingface (deepseek-community/...).")
    print("Your own checkpoint: model.source: local and model.id: /path/to/folder.")
    return 0
