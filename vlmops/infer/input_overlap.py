"""Where a batch job's input and an output meet: the job's own output inside its input is never read as input, and
another job's output in it is refused (its parts, rejects and manifest are not prompts).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import TypeVar

from vlmops.errors import UserInputError
from vlmops.infer.output import JOB_FILE
from vlmops.infer.shards import InputFile
from vlmops.plural import counted

log = logging.getLogger(__name__)

T = TypeVar("T")


def leave_out_own_output(found: list[T], is_own: Callable[[T], bool], spec: str, output: str | None) -> list[T]:
    """`found` less the job's own files (`is_own`: under its `output`), said in the log when there are any.

    Raises:
        UserInputError: every file found lies under the output (it is the input folder, or holds it).
    """
    kept = [item for item in found if not is_own(item)]
    if found and not kept:
        assert output is not None  # nothing is under no output
        raise UserInputError(
            f"input {spec}: every input file there lies under the output {output}, {_own_output_fix(spec, output)}"
        )
    if len(kept) < len(found):
        log.info(
            "input %s: left out %s under the output %s, the job's own (not input)",
            spec,
            counted(len(found) - len(kept), "file"),
            output,
        )
    return kept


def _own_output_fix(spec: str, output: str) -> str:
    """Why every input file under `output` is none, and the fix that fits: the output is the input itself, holds it
    (`--input nest/in --output nest`, where "outside the input" is no fix), or holds every file a glob names."""
    if output.startswith("s3://") or spec.startswith("s3://"):
        same = spec.rstrip("/") == output.rstrip("/")
        holds = spec.startswith(output.rstrip("/") + "/")
    else:
        inner, outer = Path(spec).expanduser().resolve(), Path(output).expanduser().resolve()
        same, holds = inner == outer, inner.is_relative_to(outer)
    # A sibling of the input, never under it nor above it (not for a glob, nor a bucket's root: another bucket).
    bucket_root = spec.startswith("s3://") and "/" not in spec[len("s3://") :].rstrip("/")
    example = "" if glob.has_magic(spec) or bucket_root else f", e.g. {spec.rstrip('/')}-results"
    own = "(the job's own files are never input)"
    if same:
        return f"which is the input itself {own}: pass an --output outside the input{example}"
    if holds:
        return f"which holds the input {own}: pass an --output that neither is the input nor holds it{example}"
    return f"{own}: pass an --output that holds none of the input files"


def refuse_other_jobs(spec: str, found: list[InputFile], read: list[InputFile]) -> None:
    """Refuse to read (`read`) files of another batch job's output that the input (`found`: every file it names)
    holds: its parts, rejects, manifest and `_job/` files are not prompts. A job's output kept beside its input
    (`--input data --output data/run1`) made the next job over `data` answer the first one's results again, and its
    manifest and job file as records. (A job's own output inside its input is left out before:
    vlmops.infer.inputs.find_inputs.)

    Raises:
        UserInputError: naming the job folders found and the fix.
    """
    jobs = {f.name.removesuffix(JOB_FILE) for f in found if f"/{f.name}".endswith(f"/{JOB_FILE}")}
    held = sorted(job.rstrip("/") or "." for job in jobs if any(f.name.startswith(job) for f in read))
    if held:
        shown = ", ".join(spec if job == "." else f"{spec.rstrip('/')}/{job}" for job in held[:3])
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise UserInputError(
            f"input {spec} holds the output of another batch job ({shown}{more}: it has {JOB_FILE}), whose parts, "
            f"rejects and manifest are not prompts: move that output out of the input{_glob_fix(spec, read, jobs)}"
        )


def _glob_fix(spec: str, read: list[InputFile], jobs: set[str]) -> str:
    """The glob of the input's own files beside another job's output in the folder `spec`, as a second fix: only where
    they lie in the folder itself (a `**` glob would take in the job's parts again); none for a glob or an S3 prefix
    (not globbed)."""
    prompts = [f.name for f in read if not any(f.name.startswith(job) for job in jobs)]
    if spec.startswith("s3://") or glob.has_magic(spec) or not prompts or any("/" in name for name in prompts):
        return ""
    suffixes = {PurePath(name).suffix.lower() for name in prompts}
    pattern = f"{spec.rstrip('/')}/*{suffixes.pop() if len(suffixes) == 1 else '.json*'}"
    return f", or pass the input files themselves as a glob ('{pattern}')"


def under_local_output(output: str | None) -> Callable[[Path], bool]:
    """Whether a local path lies under the local output folder (never, for no output or an S3 one)."""
    if output is None or output.startswith("s3://"):
        return lambda path: False
    folder = Path(output).expanduser().resolve()
    return lambda path: path.is_relative_to(folder)
