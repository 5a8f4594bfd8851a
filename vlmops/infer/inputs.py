"""Which files a batch job reads: `--input` names a `.jsonl` or `.json` file, a folder or glob of them, or an `s3://`
prefix.

A folder is read with its subfolders (symlinked ones too, each real folder once: vlmops.folders), and so is a glob;
a file that one reaches under two names (`b.jsonl -> a.jsonl` beside it) is read once, under the first in sorted
order, the other named in the log, as a dataset folder reads it. A file is named relative to the input (a folder's
root, a glob's common folder, the prefix), the name its records' keys fall back to. A job's own output inside its
input is never read as input (vlmops.infer.input_overlap).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from vlmops.config import StorageConfig
from vlmops.errors import UserInputError
from vlmops.folders import first_names, listed_matching, listed_under, refuse_unreadable
from vlmops.infer.input_overlap import leave_out_own_output, under_local_output
from vlmops.infer.shards import InputFile
from vlmops.plural import counted

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".jsonl", ".json")


def find_inputs(spec: str, storage: StorageConfig | None = None, output: str | None = None) -> list[InputFile]:
    """The input files `spec` names, in a stable order (sorted by name). A folder, glob or prefix never yields what
    lies under `output` (the job's own output location, when it sits inside its input: its parts, rejects, manifest
    and `_job/` files would otherwise be read as input on a rerun, and make it another job), nor a file a second time
    under another name (`vlmops.folders.first_names`: the first in sorted order is read, so each run plans the same
    job).

    Raises:
        FileNotFoundError: nothing there, or no .json/.jsonl file in it.
        UserInputError: an input file it names is a broken link or no file (a named pipe), before any is read.
    """
    if spec.startswith("s3://"):
        return _find_s3_inputs(spec, storage, output)
    path = Path(spec).expanduser()
    if path.is_file():
        _check_suffix(path.name, spec)
        # By its own name, a link too (a hub cache's `a.jsonl -> ../blobs/3f2a...`): its suffix picks the reader.
        return [InputFile(str(path.parent.resolve() / path.name), path.name)]
    if path.is_dir():
        root = path.resolve()
        listed = listed_under(root)
        _name_unread(spec, [p.relative_to(root).as_posix() for p in listed if p.is_file()])
        found = [p for p in listed if p.suffix.lower() in INPUT_SUFFIXES]
        found = leave_out_own_output(found, under_local_output(output), spec, output)
        refuse_unreadable(found)  # what would be read: a broken `notes.txt` link beside the inputs is no matter
        files = [InputFile(str(p), p.relative_to(root).as_posix()) for p in first_names(found).values()]
    elif glob.has_magic(spec):
        # Matched by a walk, as a folder is read (each real file once, a link loop left); broken links are listed too:
        # one named like an input is refused, as in a folder.
        matched = listed_matching(path)
        refuse_unreadable(p for p in matched if p.suffix.lower() in INPUT_SUFFIXES)
        found = sorted(_as_matched(p, path) for p in matched if p.is_file())
        _name_unread(spec, [str(p) for p in found])
        found = [p for p in found if p.suffix.lower() in INPUT_SUFFIXES]
        found = list(first_names(leave_out_own_output(found, under_local_output(output), spec, output)).values())
        root = Path(os.path.commonpath([p.parent for p in found])) if found else Path()
        files = [InputFile(str(p), p.relative_to(root).as_posix()) for p in found]
    else:
        refuse_unreadable([path] if path.is_symlink() or path.exists() else [])  # a broken link: say where it leads
        raise FileNotFoundError(f"input {spec} does not exist: pass a .jsonl/.json file, a folder, a glob or s3://")
    if not files:
        raise FileNotFoundError(f"input {spec}: no .jsonl or .json files there")
    return files


def _as_matched(match: Path, pattern: Path) -> Path:
    """A glob's match by the names it was matched with, below the pattern's folder (resolved, as an input folder is):
    a link's own name, `a.jsonl -> ../blobs/3f2a...` (a hub cache's layout), not its target's, which has no suffix
    and would leave the file out; a linked subfolder's name, as a folder input names it."""
    literal = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), pattern.parts))
    return literal.resolve() / match.relative_to(literal)


LOOKS_LIKE_RECORDS = re.compile(r"\.json|\.ndjson$|\.jsonlines$", re.IGNORECASE)
"""Names of files that hold records in a form the job does not read: `a.jsonl.gz`, `a.json.zst`, `a.ndjson`."""


def _name_unread(spec: str, names: Sequence[str]) -> None:
    """Warn of the files a folder, glob or prefix holds that look like records but are not read (not .jsonl/.json): a
    compressed `.jsonl.gz` beside the prompts left its records out without a word. Images and other files beside
    the prompts are not named, nor hidden ones (a job's scratch files)."""
    unread = [
        name
        for name in names
        if not name.lower().endswith(INPUT_SUFFIXES)
        and LOOKS_LIKE_RECORDS.search(name.rpartition("/")[2])
        and not any(part.startswith(".") for part in name.split("/"))
    ]
    if unread:
        more = f" and {len(unread) - 5} more" if len(unread) > 5 else ""
        log.warning(
            "input %s: %s named like records, not read (only .jsonl and .json are): %s%s; "
            "decompress or rename each to answer its records",
            spec,
            counted(len(unread), "file"),
            ", ".join(unread[:5]),
            more,
        )


def _check_suffix(name: str, spec: str) -> None:
    if not name.lower().endswith(INPUT_SUFFIXES):
        raise UserInputError(f"input {spec}: unsupported file type; use .jsonl (a record per line) or .json (a list)")


def _find_s3_inputs(spec: str, storage: StorageConfig | None, output: str | None = None) -> list[InputFile]:
    from vlmops.storage import list_uri, parse_s3_uri

    listing = list_uri(spec, storage)
    if listing.single:
        [obj] = listing.objects
        _check_suffix(obj.key, spec)
        return [InputFile(listing.uri(obj), listing.name(obj))]
    _name_unread(spec, [listing.name(o) for o in listing.objects])
    found = [o.key for o in listing.objects if o.key.lower().endswith(INPUT_SUFFIXES)]
    if output is not None and output.startswith("s3://"):
        out_bucket, out_prefix = parse_s3_uri(output)
        own = f"{out_prefix}/" if out_prefix else ""  # the bucket's root holds every key
        found = leave_out_own_output(
            found, lambda key: out_bucket == listing.bucket and key.startswith(own), spec, output
        )
    files = [InputFile(f"s3://{listing.bucket}/{key}", key[len(listing.folder) :]) for key in found]
    if not files:
        raise FileNotFoundError(f"input {spec}: no .jsonl or .json objects under it")
    return files
