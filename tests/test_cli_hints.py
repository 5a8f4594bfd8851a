"""Every `vlmops ...` command that the program or the docs tell a user to run parses with the real parser.

Collected from: backticked `vlmops ...` in the library's source (error messages, hints, docstrings), the README
(code blocks and inline code), and the comments of pipeline.yaml and configs/*.yaml. Placeholders (`<name>`,
`RUN_DIR`, ...) parse as plain values; `[...]` marks optional parts (kept, brackets dropped); `...` is elision.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import NoReturn

import pytest

from vlmops.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
BACKTICKED = re.compile(r"`((?:[A-Z_]+=\S+\s+)*vlmops\s[^`]*)`")
COMMENT_LINE = re.compile(r"#\s{2,}((?:[A-Z_]+=\S+\s+)*vlmops\s.*)$")  # an indented command line in a comment
CODE_LINE = re.compile(r"^\s*((?:[A-Z_]+=\S+\s+)*vlmops\s[^#]*)")


def _hinted_commands() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for file in sorted((ROOT / "vlmops").rglob("*.py")):
        text = file.read_text(encoding="utf-8")
        found += [(f"{file.relative_to(ROOT)}", m) for m in BACKTICKED.findall(text)]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found += [("README.md", m) for m in BACKTICKED.findall(readme)]
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a command continued with a backslash
            if m := CODE_LINE.match(line):
                found.append(("README.md", m.group(1)))
    for file in [ROOT / "pipeline.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        for line in file.read_text(encoding="utf-8").splitlines():
            if m := COMMENT_LINE.search(line):
                found.append((f"{file.relative_to(ROOT)}", m.group(1).split("  #")[0]))
    return found


def _argv(command: str) -> list[str]:
    command = command.replace("[", " ").replace("]", " ")
    command = re.sub(r"\s\.\.\.(?=\s|$)", " ", command)  # "..." is elision
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S+", words[0]):  # NPROC_PER_NODE=4 vlmops ...
        words.pop(0)
    assert words[0] == "vlmops", command
    return words[1:]


COMMANDS = _hinted_commands()


def test_the_docs_hint_at_commands() -> None:
    files = {where for where, _ in COMMANDS}
    assert "README.md" in files and "pipeline.yaml" in files and any(f.startswith("configs/") for f in files)
    assert len(COMMANDS) >= 20


class _RefusedError(Exception):
    pass


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c}" for w, c in COMMANDS])
def test_hinted_command_exists_with_its_flags(where: str, command: str) -> None:
    """The command and each flag it shows exist, and the words parse."""
    argv = _argv(command)
    if not argv or argv[0] == "COMMAND" or argv[0].startswith("-"):  # `vlmops COMMAND --help`, `vlmops --help`
        return
    parser = build_parser()
    commands = _commands(parser)
    assert argv[0] in commands, f"{where} tells users to run `{command}`: there is no command {argv[0]!r}"
    sub = commands[argv[0]]
    flags = {s for a in sub._actions for s in a.option_strings}
    unknown = [w.split("=")[0] for w in argv[1:] if w.startswith("-") and w.split("=")[0] not in flags]
    assert not unknown, f"{where} tells users to run `{command}`: `vlmops {argv[0]}` takes no {unknown}"

    def refuse(message: str) -> NoReturn:
        raise _RefusedError(message)

    sub.error = parser.error = refuse  # type: ignore[method-assign]
    try:
        parser.parse_args(argv)
    except _RefusedError as err:
        # A mention may leave out required arguments or the value of its last flag (`vlmops infer --ckpt`).
        mention = "required" in str(err) or (argv[-1].startswith("-") and "expected one argument" in str(err))
        if not mention:
            pytest.fail(f"{where} tells users to run `{command}`, which the parser refuses: {err}")
