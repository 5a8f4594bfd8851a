"""`vlmops COMMAND ...`: builds the parser from the command modules and maps errors to exit codes.

vlmops run       [--config pipeline.yaml] [--set key=value ...]   the whole pipeline (Prefect flow)
vlmops sft       [--config ...] [--set ...] [--run-dir DIR]        fine-tune (LoRA or full)
vlmops infer     --model NAME|DIR|models:/NAME@ALIAS | --ckpt RUN  interactive chat
vlmops batch-infer --model M --input IN --output OUT [--set ...]  resumable batch inference job
vlmops batch-status OUT [--json]                                  where that job stands (shards, records, rejects)
vlmops promote   [--config ...] [--set ...] [--challenger V]       challenger vs champion; move `champion`
vlmops pull      models:/NAME@ALIAS [--config ...] [--out DIR]     restore a version's dataset and model (DVC)
vlmops app       --model M [--compare M2] [--host H --auth U:P]     chat page in the browser, side by side
vlmops export    --ckpt RUN --merge-lora [--out DIR] [--config]    merge LoRA into a plain checkpoint
vlmops eval      --ckpt RUN [--config] [--out DIR]                 accuracy on the run's eval split
vlmops validate  [PATH ...] [--config ...] [--set ...]             check dataset files, print the report
vlmops download  [NAME] [--refresh] [--config ...] [--set ...]     fetch (and convert) a model
vlmops convert   SRC DST                                           original release -> transformers
vlmops models                                                      the model catalog
vlmops demo-data OUT                                               write the synthetic demo dataset
vlmops config    [--show] [--config ...] [--set ...]               print the resolved config, every key
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from vlmops import quiet
from vlmops.cli import (
    app,
    batch_infer,
    batch_status,
    config,
    convert,
    demo_data,
    download,
    evaluate,
    export,
    infer,
    models,
    promote,
    pull,
    run,
    sft,
    validate,
)
from vlmops.errors import VlmopsError
from vlmops.outages import ServiceUnavailable, rerun_advice, retry_delay_setting, unreachable_service
from vlmops.redact import redact_log_handlers, redact_text
from vlmops.stopping import StopSignal, exit_status, stop_reason

Handler = Callable[[argparse.Namespace], int]

RUN_AGAIN = "run the command again"
"""What to do once a server that did not answer is back, for a command that says nothing more of its own."""

# In the order `vlmops --help` lists them.
COMMANDS = (
    run,
    sft,
    infer,
    batch_infer,
    batch_status,
    promote,
    pull,
    app,
    export,
    evaluate,
    validate,
    download,
    convert,
    models,
    demo_data,
    config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmops",
        description="Fine-tune, evaluate and ship DeepSeek-VL models.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="vlmops's debug lines, tracebacks on errors, and the third-party warnings, banners and INFO lines hidden "
        "by default; -vv: every library's debug lines too, with the HTTP clients' line per request (Prefect's API "
        f"calls). {quiet.VERBOSE_ENV}=1 or 2 in the environment does the same",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    module: ModuleType
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # What the handlers and the child processes see: the flag's level or the environment's, the larger.
        args.verbose = max(args.verbose, quiet.env_verbosity())
        retry_delay_setting()  # read by the tasks' retries (tasks.retry), which keep their own waits for a bad one
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    quiet.configure(args.verbose)
    logging.basicConfig(
        level=quiet.root_level(args.verbose),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    redact_log_handlers()
    quiet.no_usage_reports()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler: Handler = args.handler
    try:
        return naming_outages(handler, args)
    except VlmopsError as err:
        if args.verbose:
            raise
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return err.exit_code
    except (ValueError, FileNotFoundError) as err:
        # Plain ValueError / FileNotFoundError from the standard library or pydantic: bad input too.
        if args.verbose:
            raise
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, StopSignal) as stop:  # StopSignal: where a command takes SIGTERM as Ctrl-C (batch-infer)
        print(stop_reason(stop), file=sys.stderr)
        return exit_status(stop)


def naming_outages(handler: Handler, args: argparse.Namespace) -> int:
    """`handler(args)`; a client's own error (botocore's, requests', MLflow's, httpx's for the Prefect API) of a server
    that did not answer (after the client's retries, if any), raised again as `ServiceUnavailable`: the service and its URL
    rather than a traceback of the client's internals, exit 1 (a failed run that a rerun may pass; a ValueError raised
    from the outage is no bad input, exit 2). So is an outage the core named without advice (a DVC remote). An error
    of vlmops' own says what failed and what to do already (`vlmops batch-infer` names an outage with its own advice,
    a registry lookup says the registry could not be reached)."""
    try:
        return handler(args)
    except ServiceUnavailable as err:
        if err.then:
            raise
        raise ServiceUnavailable(err.outage, rerun_advice(RUN_AGAIN)) from err
    except VlmopsError:
        raise
    except Exception as err:
        outage = unreachable_service(err)
        if outage is None:
            raise
        raise ServiceUnavailable(outage, rerun_advice(RUN_AGAIN)) from err


if __name__ == "__main__":
    sys.exit(main())
