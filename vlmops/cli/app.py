"""`vlmops app`: a chat web page for a model; `--compare` answers every turn with a second model beside it."""

from __future__ import annotations

import argparse
import os
import sys

from vlmops.app.access import AUTH_ENV, DEFAULT_HOST, page_login
from vlmops.cli.args import add_config_args
from vlmops.errors import UserInputError

DEFAULT_PORT = 7860


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app", help="chat page in the browser (images, streamed answers); --compare puts two models side by side"
    )
    p.add_argument("--model", "-m", required=True, help="checkpoint or run folder, models:/NAME@ALIAS, or catalog name")
    p.add_argument(
        "--compare", metavar="MODEL", help="a second model answering the same turns, e.g. models:/NAME@champion"
    )
    add_config_args(p, default=None)
    p.add_argument("--system", help="system prompt (default: the model's; '' for none)")
    p.add_argument(
        "--host", default=DEFAULT_HOST, help=f"interface to serve on (default {DEFAULT_HOST}: this machine only)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help=f"login the page asks for; required with a --host other machines can reach (or set {AUTH_ENV})",
    )
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    # Refuse an open page on the network before spending minutes loading models.
    login = page_login(args.host, args.auth, os.environ)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing phones home (read when gradio is imported)
    try:
        from vlmops.app.page import serve
    except ImportError as err:
        raise UserInputError(f"the chat page needs gradio ({err}): pip install 'vlmops[app]'") from err
    from vlmops.app.models import load_page_model

    models = []
    for ref in (args.model, args.compare):
        if ref is not None:
            print(f"loading {ref} ...", file=sys.stderr, flush=True)
            models.append(load_page_model(ref, args.config, args.overrides, args.system))
    for model in models:
        print(f"{model.card.label}: {model.chat.source.describe()} on {model.chat.loaded.device}", flush=True)
    print(
        f"chat page on http://{args.host}:{args.port}" + (" (login required)" if login else "") + "; Ctrl-C stops it",
        flush=True,
    )
    serve(models, args.host, args.port, login)
    return 0
