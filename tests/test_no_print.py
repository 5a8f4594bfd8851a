"""Library modules never print: they log, return results and raise typed errors; vlmops/cli/ presents them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prints(file: Path) -> list[int]:
    tree = ast.parse(file.read_text(encoding="utf-8"))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]


def test_library_modules_do_not_print() -> None:
    library = [f for f in (ROOT / "vlmops").rglob("*.py") if "cli" not in f.relative_to(ROOT / "vlmops").parts]
    assert len(library) > 30
    found = [f"{f.relative_to(ROOT)}:{line}" for f in library for line in _prints(f)]
    assert not found, f"print() in library modules (log, or return the text to vlmops/cli/): {found}"
