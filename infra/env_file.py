"""The `.env` file of the team stack (copied from `.env.example`): read by infra/local/stack.py and
infra/server_objects.py; docker compose reads the same file itself (`--env-file .env`)."""

from __future__ import annotations

from pathlib import Path


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments, blank lines and `export ` prefixes allowed; quotes stripped);
    {} when there is no such file.

    Raises:
        ValueError: a line that is not KEY=VALUE, named by file and line.
    """
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        values[key.strip()] = value.strip().strip("'\"")
    return values
