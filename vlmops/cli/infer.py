"""`vlmops infer`: an interactive, streamed, multi-turn chat in the terminal, as the seed's `swift infer`.

    <<< <img>cat.png</img><img>https://host/dog.png</img>What differs between them?
    The first image shows ...
    --------------------------------------------------
    <<< clear          forget the conversation so far
    <<< quit           (or exit, or Ctrl-D) leave

`--ckpt RUN_DIR` chats with a trained run: its adapter on its base model (or its full weights), with the
run's saved config (system prompt, generation settings), as the seed's
`swift infer --ckpt_dir ... --load_dataset_config true`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from vlmops.cli.args import add_config_args
from vlmops.plural import counted

if TYPE_CHECKING:
    from vlmops.config import PipelineConfig
    from vlmops.infer.chat import ChatModel, History

log = logging.getLogger(__name__)

PROMPT = "<<< "
SEPARATOR = "-" * 50
QUIT_WORDS = ("quit", "exit")
CLEAR_WORD = "clear"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="chat with a model; <img>path-or-URL</img> in a query adds an image")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", "-m", help="catalog name, checkpoint folder, or models:/NAME@ALIAS")
    source.add_argument("--ckpt", help="a training run (or checkpoint) folder: base model + trained weights")
    add_config_args(p, default=None)
    p.add_argument("--system", help="system prompt (default: the model's; '' for none)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Load the model, then chat on stdin/stdout until `quit`, `exit` or Ctrl-D.

    `--model`: a checkpoint folder, run folder, catalog name or `models:/NAME@ALIAS`; `--ckpt`: a run folder.
    `--config`: None means the run's saved config (a run folder, given either way, as `vlmops app` takes it), else
    the defaults.
    """
    from vlmops.infer.resolve import config_for_model, saved_run_folder
    from vlmops.train.rundir import run_config

    if not args.verbose:  # a chat session shows answers, not library progress logs
        logging.getLogger().setLevel(logging.WARNING)
    # A run folder given as --model (a `vlmops sft` run, or a retrain flow run's folder: its merged/) comes with
    # its saved config, as `vlmops app --model` takes it.
    run = args.ckpt or (saved_run_folder(args.model) if args.model else None)
    config = run_config(run, args.config, args.overrides)
    if args.model:
        config = config_for_model(config, args.model, args.overrides)
    chat_model = _load(args.model, args.ckpt, config, args.system)
    _import_readline()
    return chat_loop(chat_model, input, sys.stdout)


def chat_loop(chat_model: ChatModel, read: Callable[[str], str], out: TextIO) -> int:
    """The read-answer loop: one turn per line, answers streamed as they are generated."""
    # Ctrl-C stops an answer: a parent that ignored SIGINT (a non-interactive shell's background job, a test
    # runner) passes that disposition on through exec, and the answer would run on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    device = chat_model.loaded.device
    out.write(
        f"model: {chat_model.source.describe()} on {device}\n"
        f"Type a message; <img>path-or-URL</img> adds an image. `{CLEAR_WORD}` forgets the conversation, "
        f"`{QUIT_WORDS[0]}` or Ctrl-D leaves.\n"
    )
    history: History = []
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        query = line.strip()
        if not query:
            continue
        if query.lower() in QUIT_WORDS:
            return 0
        if query.lower() == CLEAR_WORD:
            out.write(f"history cleared: {counted(len(history), 'earlier turn')} forgotten\n")
            history = []
            continue
        history = _turn(chat_model, query, history, out)
        out.write(SEPARATOR + "\n")
        out.flush()


def _turn(chat_model: ChatModel, query: str, history: History, out: TextIO) -> History:
    """Stream one answer; return the history with this turn, or unchanged if the turn failed or was stopped.

    Ctrl-C during the turn sets an event that ends generation after the current token, rather than raising
    KeyboardInterrupt: an exception raised by the signal inside the streamer's queue can leave its lock held,
    and the generating thread, blocked on it, would never see the stop.
    """
    stopped = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stopped.set())
    shown = 0
    response = ""
    try:
        for response in chat_model.chat_stream(query, history, stop=stopped):
            out.write(response[shown:])
            out.flush()
            shown = len(response)
        out.write("\n")
    except (ValueError, OSError, RuntimeError) as err:
        # One bad turn (an unreadable image, out of memory on a long history) should not end the session.
        log.debug("turn failed", exc_info=True)
        out.write(("\n" if shown else "") + f"error: {err}\n")
        return history
    finally:
        signal.signal(signal.SIGINT, previous)
    if stopped.is_set():
        out.write("[stopped: this turn is not kept in the history]\n")
        return history
    return [*history, [chat_model.history_turn(query), response]]


def _load(model: str | None, ckpt: str | None, config: PipelineConfig, system: str | None) -> ChatModel:
    target, adapter = model, ckpt
    if target is None:
        target, adapter = ckpt, None  # the run says which base model its adapter belongs to
    if target is None:
        target = config.model.id if config.model.source == "local" and config.model.id else config.model.name
    print(f"loading {target}" + (f" with {adapter}" if adapter else "") + " ...", file=sys.stderr, flush=True)
    from vlmops.infer.chat import ChatModel

    return ChatModel.from_config(target, config, adapter, system)


def _import_readline() -> None:
    """Line editing and input history at the prompt, where the platform has GNU readline."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401
