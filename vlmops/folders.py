"""The files under a folder someone gave (an input folder, a model folder), symlinked subfolders included.

`Path.rglob` does not go into a symlinked subfolder (Python 3.11 and 3.12), so a batch input folder with
`batch2 -> /mnt/data/batch2` in it would lose those records without a word. `walk` follows such links, names each file
by its path through the link (what the user sees), and goes into each real folder once: a link back up the tree is
logged and left, not followed round. A folder it cannot list (no read permission, gone mid-walk) is refused by name:
`os.walk` passes over it without a word unless told otherwise, and its files would be left out. `files_under` lists
the files; a step's cache key (vlmops.fingerprints) walks the same way, so what a step reads and what its key sees
are the same files. `listed_matching` matches a glob by the same walk (`glob.glob` follows a linked folder under `**`
as often as it comes to it, round a loop too), its names matched by wcmatch, so a batch input glob reads what a folder
input would. A file that a folder or glob reaches under two names (`b.jsonl -> a.jsonl` beside it) is read once, under
the first (`first_names`), as a dataset folder and a batch input read it.

A name the walk lists that is no file (a broken link such as `part3.jsonl -> /mnt/gone/part3.jsonl`, a named pipe)
is refused when the caller would read it (`files_under`'s `reads`, `refuse_unreadable`): skipped, it would make a job
answer fewer records, or a model's hash and upload miss a file, with no word said.

`quiet`: a cache key lists what its step will read, and the step says what it left out; said by both, a flow's log
would name each thing twice.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import stat
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path, PurePath

from wcmatch import glob as wcglob

from vlmops.errors import UserInputError
from vlmops.plural import counted

log = logging.getLogger(__name__)

NAMED = 5
"""How many of the entries refused `refuse_unreadable` names in its message."""


def _every(path: Path) -> bool:
    return True


def walk(
    root: Path,
    keep: Callable[[Path], bool] = _every,
    visit: Callable[[Path], Hashable] = Path.resolve,
    *,
    quiet: bool = False,
) -> Iterator[tuple[list[Path], list[Path]]]:
    """For `root` and each folder below it: the symlinks to folders in it, and the names `os.walk` lists as its
    files (a broken link among them). Folder links are followed, and each real folder is walked once, under its first
    name in sorted order (a walk goes depth-first, each folder's subfolders in sorted order); one reached again (a
    second link to it, a link back up the tree) is logged (unless `quiet`) and left. `keep(path)` False leaves a
    subfolder (and its link) out; `visit(path)` is what makes two folders the same: their real folder (a glob's walk
    adds the place in the pattern the folder's name reaches, `listed_matching`).

    Raises:
        UserInputError: `root` or a folder below it that the walk goes into cannot be listed, named with the error.
    """
    seen: dict[Hashable, Path] = {}  # each visit, by the name it was read under
    for folder, dirs, names in os.walk(root, onerror=_refuse_unlisted, followlinks=True):
        here = Path(folder)
        # Checked as the walk comes to a folder, not as its parent is listed: the walk then meets every folder's names
        # in sorted order, so the name kept is the first in sorted order, however deep the others lie.
        if (first := seen.get(visited := visit(here))) is not None:
            if not quiet:
                how = "links to" if here.is_symlink() else "is"
                log.warning("%s %s %s, already read as %s: not read twice", here, how, here.resolve(), first)
            dirs[:] = []
            continue
        seen[visited] = here
        dirs[:] = sorted(name for name in dirs if keep(here / name))
        yield [here / name for name in dirs if (here / name).is_symlink()], [here / name for name in names]


def _refuse_unlisted(err: OSError) -> None:
    """os.walk's `onerror`: a folder it could not list would lose its files without a word."""
    if isinstance(err, FileNotFoundError):
        fix = "it went away while it was read: put it back (or leave it out of the input) and run again"
    else:
        fix = "give read permission or remove it from the input"
    raise UserInputError(f"cannot list folder {err.filename} ({err.strerror or err}): {fix}") from err


def listed_under(root: Path, *, quiet: bool = False) -> list[Path]:
    """Every name a walk of `root` lists as a file, sorted by path: the files (symlinks to files and to folders
    followed), and any broken link or named pipe among them."""
    return sorted(path for _, names in walk(root, quiet=quiet) for path in names)


def listed_matching(pattern: Path) -> list[Path]:
    """Every name a walk lists as a file (a broken link or a named pipe among them) that the glob `pattern` matches as
    `glob.glob(pattern, recursive=True)` would (`_GlobParts`), sorted by path: by the names it was matched with, below
    the pattern's folder (its parts up to the first wildcard), as given.

    `glob.glob` follows a linked folder under `**` each time it is reached: a folder linked twice had its files
    matched under both names (records read twice), and a link back up the tree was followed round until the system
    refused (40 links deep). This walks the pattern's folder as `walk` does, into each real folder once for each place
    in the pattern its name reaches (the same folder at the same place matches the same files): a loop is logged and
    left, and a subfolder the pattern cannot reach is not listed. A file a reader finds here under two names (its
    folder matched at two places, a link to it beside it) is the reader's to read once (`first_names`).

    Raises:
        UserInputError: a `..` after a wildcard (a walk lists no `..`); a folder the walk goes into cannot be listed.
    """
    literal = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), pattern.parts))
    parts = pattern.parts[len(literal.parts) :]
    if ".." in parts:
        raise UserInputError(
            f"{pattern}: a '..' after a wildcard is not followed (a folder's walk lists no '..'): write the folder it "
            "leads to instead"
        )
    if not literal.is_dir():
        return []
    wildcards = _GlobParts(parts)

    def place(path: Path) -> frozenset[int]:
        return wildcards.places(path.relative_to(literal))

    walked = walk(literal, keep=lambda path: wildcards.goes_on(place(path)), visit=lambda p: (p.resolve(), place(p)))
    return sorted(path for _, names in walked for path in names if wildcards.matches(path.relative_to(literal)))


GLOB_FLAGS = wcglob.GLOBSTAR | wcglob.FORCEUNIX
"""wcmatch's rules for `glob.glob(..., recursive=True)`'s on POSIX: `*`, `?` and `[...]` within a name, `**` for any
number of folders, no name that starts with "." unless the pattern's part does, case kept; no braces, extglobs or
negated patterns."""


class _GlobParts:
    """A glob's parts below its folder (a relative path's parts), matched by wcmatch as `glob.glob(...,
    recursive=True)` matches them, a backslash a character as there (wcmatch escapes with it), but for:
    - `[^a]`, which negates as `[!a]` does, and `[[:digit:]]`, a class, as in a shell (`glob.glob` reads the
      characters written: `^` or `a`);
    - a file where a folder stands: `glob.glob` gives `x/c.jsonl/` for `*/c.jsonl/**`, whose `**` took no folder after
      the file; no file holds anything to match.

    The one thing written here: where in the pattern a folder stands (`places`), which a walk asks and wcmatch has no
    call for. The same real folder at the same places matches the same files below it; at others (`in/a -> X` and
    `in/c/b -> X` under `in/**/b/*.jsonl`), other files.
    """

    def __init__(self, parts: Sequence[str]):
        self.parts = tuple(parts)
        self._prefixes = [  # the pattern's first i parts, for each i
            wcglob.compile("/".join(self.parts[:i]).replace("\\", "\\\\"), flags=GLOB_FLAGS)
            for i in range(len(self.parts) + 1)
        ]

    def places(self, path: PurePath) -> frozenset[int]:
        """How many of the pattern's parts a folder's relative `path` may have taken: each `i` whose first `i` parts
        match it, and those a `**` next to it joins: a `**` takes no folder, or any number more, so a path that
        stands past one stands before it too, and one before it past it (`in/up -> in` under `in/**/*.jsonl` stands
        where `in` does, and is a loop)."""
        name = path.as_posix() if path.parts else ""
        places = {i for i, prefix in enumerate(self._prefixes) if prefix.match(name)}
        for i in list(places):
            back, ahead = i, i
            while back > 0 and self.parts[back - 1] == "**":
                back -= 1
            while ahead < len(self.parts) and self.parts[ahead] == "**":
                ahead += 1
            places.update(range(back, ahead + 1))
        return frozenset(places)

    def goes_on(self, places: frozenset[int]) -> bool:
        """Whether a folder at `places` may hold a match: some part is left to match below it."""
        return any(i < len(self.parts) for i in places)

    def matches(self, path: PurePath) -> bool:
        """Whether a file's relative `path` matches the whole pattern."""
        return self._prefixes[-1].match(path.as_posix())


def files_under(root: Path, reads: Callable[[Path], bool] = _every, *, quiet: bool = False) -> list[Path]:
    """The files under `root` (symlinks to files and to folders followed) whose path `reads` selects, sorted by path.

    Raises:
        UserInputError: a path `reads` selects is no file to read (a broken link, a named pipe): named, with the fix.
    """
    chosen = [path for path in listed_under(root, quiet=quiet) if reads(path)]
    refuse_unreadable(chosen)
    return chosen


def first_names(paths: Iterable[Path], *, quiet: bool = False) -> dict[Path, Path]:
    """Each file among `paths` (files to read, in the order read: sorted) by the file its links lead to
    (`Path.resolve`), named by the first of its names; each other name is logged (unless `quiet`), and not read: a
    folder's own links (`b.jsonl -> a.jsonl` beside it, a hub snapshot's, a DVC checkout's) may not be the user's to
    change, and its records would be read twice."""
    named: dict[Path, Path] = {}
    for path in paths:
        first = named.setdefault(real := path.resolve(), path)
        if first != path and not quiet:
            log.warning("%s is %s by another name (both lead to %s): not read twice", path, first, real)
    return named


def refuse_unreadable(paths: Iterable[Path]) -> None:
    """Refuse to go on when one of `paths`, which a step is about to read, is no file: a broken link (named with where
    it leads) or a named pipe, socket or device. Folders are for the caller to leave out.

    Raises:
        UserInputError: naming each such path (the first few) and what to do.
    """
    found = [problem for path in paths if (problem := _not_a_file(path)) is not None]
    if not found:
        return
    more = f"; and {len(found) - NAMED} more" if len(found) > NAMED else ""
    raise UserInputError(f"cannot read {counted(len(found), 'file')}: {'; '.join(found[:NAMED])}{more}")


def _not_a_file(path: Path) -> str | None:
    """What is wrong with reading `path` and the fix, or None for a regular file (or a folder)."""
    try:
        found = path.stat()
    except OSError as err:
        if not path.is_symlink():
            raise
        return (
            f"{path} is a broken symlink to {path.readlink()} ({err.strerror or err}): restore the target or "
            "remove the link"
        )
    if stat.S_ISREG(found.st_mode) or stat.S_ISDIR(found.st_mode):
        return None
    kind = (
        "a named pipe" if stat.S_ISFIFO(found.st_mode) else "a socket" if stat.S_ISSOCK(found.st_mode) else "a device"
    )
    where = f"{path} links to {path.readlink()}, {kind}" if path.is_symlink() else f"{path} is {kind}"
    return f"{where}, not a file: put the file there or remove it"
