"""The `vlmops` command. Each subcommand is a thin wrapper over the library; `run` starts the retrain flow.

vlmops run       [--config pipeline.yaml] [--set key=value ...]   the whole pipeline (Prefect flow)
vlmops sft       [--config ...] [--set ...] [--run-dir DIR]        fine-tune (LoRA or full)
vlmops infer     --model NAME|DIR|models:/NAME@ALIAS | --ckpt RUN  interactive chat
vlmops export    --ckpt RUN --merge-lora [--out DIR] [--config]    merge LoRA into a plain checkpoint
vlmops eval      --ckpt RUN [--config] [--out DIR]                 accuracy on the run's eval split
vlmops validate  [--config ...] [--set ...]                        check a dataset, print the report
vlmops download  [--config ...] [--set ...]                        fetch (and convert) the base model
vlmops convert   SRC DST                                           original release -> transformers
vlmops models                                                      the model catalog
vlmops demo-data OUT                                               write the synthetic demo dataset
vlmops config    [--config ...] [--set ...]                        print the resolved config
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vlmops.config import ConfigError

Handler = Callable[[argparse.Namespace], int]


def _config_args(parser: argparse.ArgumentParser, default: str | None = "pipeline.yaml") -> None:
    parser.add_argument(
        "--config", "-c", default=default, help=f"pipeline config file (default: {default or 'built-in defaults'})"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    # The one place the library reaches up to the orchestration layer: `vlmops run` is the flow's launcher.
    from flows.retrain import run_from_cli

    return run_from_cli(args.config, args.overrides)


def cmd_sft(args: argparse.Namespace) -> int:
    from vlmops.train.launch import sft_command

    return sft_command(args.config, args.overrides, args.run_dir)


def cmd_infer(args: argparse.Namespace) -> int:
    from vlmops.infer.interactive import infer_command

    if not args.verbose:  # a chat session shows answers, not library progress logs
        logging.getLogger().setLevel(logging.WARNING)
    return infer_command(args.model, args.ckpt, args.config, args.overrides, args.system)


def cmd_export(args: argparse.Namespace) -> int:
    from vlmops.train.merge import export_command

    return export_command(args.ckpt, args.merge_lora, args.out, args.config, args.overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    from vlmops.evaluate.metrics import eval_command

    return eval_command(args.ckpt, args.config, args.overrides, args.out)


def cmd_validate(args: argparse.Namespace) -> int:
    from vlmops.data.validate_command import validate_command

    return validate_command(args.config, args.overrides)


def cmd_download(args: argparse.Namespace) -> int:
    from vlmops.models.download import download_command

    return download_command(args.config, args.overrides)


def cmd_convert(args: argparse.Namespace) -> int:
    from vlmops.models.convert import convert_command

    return convert_command(args.src, args.dst)


def cmd_models(args: argparse.Namespace) -> int:
    from vlmops.models.catalog import models_command

    return models_command()


def cmd_demo_data(args: argparse.Namespace) -> int:
    from vlmops.data.demo import write_demo_dataset

    train, evals = write_demo_dataset(args.out, args.num_train, args.num_eval, args.image_size, args.seed)
    print(f"wrote {train} and {evals}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from vlmops.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmops",
        description="Fine-tune, evaluate and ship DeepSeek-VL models.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the retrain flow (download, validate, train, merge, eval, register)")
    _config_args(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("sft", help="fine-tune with LoRA or full SFT (NPROC_PER_NODE=N for N GPUs)")
    _config_args(p)
    p.add_argument("--run-dir", help="where checkpoints go (default: <output_dir>/sft/<run.name>)")
    p.set_defaults(handler=cmd_sft)

    p = sub.add_parser("infer", help="chat with a model; <img>path-or-URL</img> in a query adds an image")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", "-m", help="catalog name, checkpoint folder, or models:/NAME@ALIAS")
    source.add_argument("--ckpt", help="a training run (or checkpoint) folder: base model + trained weights")
    _config_args(p, default=None)
    p.add_argument("--system", help="system prompt (default: the model's; '' for none)")
    p.set_defaults(handler=cmd_infer)

    p = sub.add_parser("export", help="export a trained run; --merge-lora merges the adapter into the base")
    p.add_argument("--ckpt", required=True, help="training run or checkpoint folder")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter (as swift export --merge_lora)")
    p.add_argument("--out", help="output folder (default: <ckpt>-merged)")
    _config_args(p, default=None)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("eval", help="evaluate a trained run on its saved eval split")
    p.add_argument("--ckpt", required=True, help="training run or checkpoint folder")
    _config_args(p, default=None)
    p.add_argument("--out", help="folder for predictions and metrics (default: <ckpt>/eval)")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("validate", help="validate the configured dataset and print its report")
    _config_args(p)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("download", help="download (and convert) the configured base model")
    _config_args(p)
    p.set_defaults(handler=cmd_download)

    p = sub.add_parser("convert", help="convert an original-layout DeepSeek-VL checkpoint to transformers")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("models", help="list the model catalog")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("demo-data", help="write the synthetic demo dataset (conversations jsonl + PNGs)")
    p.add_argument("out", type=Path)
    p.add_argument("--num-train", type=int, default=320)
    p.add_argument("--num-eval", type=int, default=40)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_demo_data)

    p = sub.add_parser("config", help="print the resolved config (validates it)")
    _config_args(p)
    p.set_defaults(handler=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's client logs every API request at INFO
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
