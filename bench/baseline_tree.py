"""The code of an earlier commit, for a benchmark that measures it beside this checkout in the same run."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_tree(revision: str, work: Path) -> Path:
    """The code of `revision` (vlmops/ and tasks/) in a folder of its own under `work` (kept: a second run reuses it).
    Put first on `sys.path`, its vlmops is the one imported."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", revision], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = work / f"tree-{commit}"
    if not (tree / "vlmops").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "vlmops", "tasks"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def tree_name(tree: Path) -> str:
    """Which tree a row imported vlmops from, without this machine's paths: this checkout, or a baseline under the
    benchmark's `--work` folder (`<work>/tree-REV`)."""
    return "this checkout" if tree.resolve() == ROOT else f"<work>/{tree.name}"
