"""`vlmops export --merge-lora`: merge a run's LoRA adapter into a plain checkpoint (parity-checked)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vlmops.cli.args import add_config_args
from vlmops.errors import UserInputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained run; --merge-lora merges the adapter into the base")
    p.add_argument("--ckpt", required=True, help="training run or checkpoint folder")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter (as swift export --merge_lora)")
    p.add_argument("--out", help="the merged model's folder, new or an earlier merge (default: <ckpt>-merged)")
    add_config_args(p, default=None)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Merge (or export a full run) and print where it went and the parity it reached.

    The merge settings (merge.parity_atol, model.dtype) come from `--config`, else the run's saved config,
    as the retrain flow takes them from its config.
    """
    from vlmops.train.merge import default_export_dir, merge_run
    from vlmops.train.rundir import open_run, run_config

    run = open_run(args.ckpt)
    if run.is_adapter and not args.merge_lora:
        raise UserInputError(f"{run.weights} is a LoRA adapter; pass --merge-lora to merge it into its base model")
    config = run_config(args.ckpt, args.config, args.overrides)
    target = Path(args.out) if args.out else default_export_dir(Path(args.ckpt))
    result = merge_run(Path(args.ckpt), target, atol=config.merge.parity_atol, dtype=config.model.dtype)
    what = "merged LoRA adapter into" if result.adapter else "exported full model to"
    print(f"{what} {result.path}")
    print(f"parity: max |logit difference| {result.max_abs_diff:.3g} (tolerance {result.atol:.3g})")
    print(
        f"load it with AutoModelForImageTextToText.from_pretrained({os.fspath(result.path)!r}), or vlmops infer --ckpt"
    )
    return 0
