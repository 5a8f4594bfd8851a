"""GPU work in a child process: training and merging run there, so the caller (a CLI, a Prefect worker) never
holds the GPU itself and gets all its memory back when the step ends.

The child starts in a process group of its own (torchrun's ranks join it): an error or Ctrl-C in the caller
stops the whole group, never leaving a rank behind on a GPU. A caller killed outright (SIGKILL, the OOM killer)
runs no clean-up, so on Linux the child is also started through `python -m vlmops.train.child PID -- COMMAND`,
which asks the kernel to kill it when its parent dies and then becomes COMMAND; each rank does the same with
its torchrun agent (`die_with_parent`). Otherwise an orphaned run would go on writing the run folder that a
rerun resumes from. A batch inference job's child and its per-GPU workers are tied the same way (vlmops.infer.parallel).

What a child writes is copied to the caller's stderr as it comes (the worker's console, a terminal) and each finished
line is logged once through CHILD_OUTPUT_LOGGER, a traceback as one record with the line it follows, each torchrun
rank's apart (`_Records`), which sends it nowhere unless a caller puts a handler there: a flow run's process does
(flows/__init__), so the lines reach the run's log on the Prefect server.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vlmops.multigpu import NO_MULTICAST_ENV

log = logging.getLogger(__name__)

TAIL_LINES = 60
STOP_GRACE_S = 30
PR_SET_PDEATHSIG = 1  # linux/prctl.h

CHILD_OUTPUT_LOGGER = "vlmops.child_output"
# A child's line names its level where vlmops wrote it: after the time (and a training rank's number) in the formats
# of `vlmops` and quiet.child_logging, as `error: ...` (a `vlmops` command's last line), or as a Python warning's
# category (`file.py:12: UserWarning: ...`). Any other line (a progress bar, a library's print) logs at INFO.
_LOGGED_LEVEL = re.compile(
    r"(?:\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d(?:,\d+)? (?:\[rank \d+\] )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) "
)
_ERROR_LINE = re.compile(r"error: ")
_PYTHON_WARNING = re.compile(r"\S.*:\d+: \w*Warning: ")

# How long a record waits, from its first line, for the lines that continue it (`_Records`): logging writes a record's
# traceback with it in one write, and an uncaught exception's traceback comes a line a write, each right after the last.
GROUP_WAIT_S = 0.5
# A traceback's first line; an exception group's is indented, as all of its lines are.
_TRACEBACK = re.compile(
    r"Traceback \(most recent call last\):|\s+\+ Exception Group Traceback \(most recent call last\):"
)
_CHAINED = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)
# A line of an exception group but its header: its frames, sub-exceptions and separators have a `|` or `+` margin, and
# the group's end is a `+---...` line (the separators between sub-exceptions have numbers: `+---- 2 ----`).
_GROUP_LINE = re.compile(r"\s+(?:\||\+(-+$)?)")
# A rank's own prefixes under torchrun: `[rank0]: ` on every line of an uncaught exception once the rank is in a process
# group (torch.distributed's excepthook writes its traceback so, in one write), and `[default0]:` (role, local rank)
# on every line a rank writes where torchrun tees its output (`--tee`), before the rank's own.
_RANK_PREFIX = re.compile(r"(?:\[rank\d+\]: |\[[A-Za-z_][\w-]*?\d+\]:)+")


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: ours, NVLink multicast off, `extra`, and this package importable."""
    child = {**os.environ, **NO_MULTICAST_ENV, **(extra or {})}
    package_root = str(Path(__file__).resolve().parents[2])
    child["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child.get("PYTHONPATH")) if p)
    return child


def run_child(command: list[str], log_file: Path, extra_env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `command` in its own process group, copying its output to our stderr (progress bars included) and
    appending it to `log_file`. Returns the exit code and the last lines of the output."""
    log.info("launching: %s", " ".join(command))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        tied_to_this_process(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_environment(extra_env),
        start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        with log_file.open("ab") as saved:
            copy_output(proc.stdout.fileno(), tail, saved)
        returncode = proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    return returncode, "\n".join(tail)


def copy_output(fd: int, tail: deque[str], saved: BinaryIO | None = None) -> None:
    """Copy a child's output from `fd` to our stderr (and to `saved`) until the child closes it, keeping its last
    non-blank lines in `tail` and logging each once through CHILD_OUTPUT_LOGGER, a traceback and the lines that
    continue a record with that record's first line (`_Records`).

    A progress bar redraws its line after a `\\r`: the line counts once it ends, as it was last drawn (its redraws
    went to stderr as they came)."""
    records = _Records(child_output_logger())
    ready = select.poll()  # not select.select: a busy worker's descriptors pass its limit of 1024
    ready.register(fd, select.POLLIN)
    partial = b""
    reads = began = 0  # `began`: the read that brought the first bytes of `partial`, the line not ended yet
    out = getattr(sys.stderr, "buffer", None)
    while True:
        while (due := records.due) is not None and not _readable_before(ready, due):
            records.log(until=due)  # their time is up: what comes later starts a record of its own
        if not (chunk := os.read(fd, 65536)):
            break
        reads += 1
        began = began if partial else reads
        if saved is not None:
            saved.write(chunk)
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode("utf-8", "replace"))
        *lines, partial = (partial + chunk).split(b"\n")
        now = time.monotonic()
        for line in lines:
            _finished_line(line, began, reads, tail, records, now)
            began = reads
        partial = _last_redraw(partial)  # a bar that redraws for hours keeps only what it shows now
    _finished_line(partial, began, reads, tail, records, time.monotonic())  # the child's last line, without its newline
    records.log()


def _readable_before(ready: select.poll, deadline: float) -> bool:
    """Whether the output `ready` polls has more to read before `deadline` (time.monotonic), waiting till then."""
    left = deadline - time.monotonic()
    return left > 0 and bool(ready.poll(math.ceil(left * 1000)))


def _last_redraw(line: bytes) -> bytes:
    """`line` from its last redraw on, that redraw's `\\r` kept (it marks a bar's line): from its last `\\r` but
    for those that end it (`\\r\\n`)."""
    drawn = line.rstrip(b"\r")
    return line[max(drawn.rfind(b"\r"), 0) :]


def _finished_line(line: bytes, began: int, ended: int, tail: deque[str], records: _Records, now: float) -> None:
    drawn = line.rstrip(b"\r")
    text = drawn[drawn.rfind(b"\r") + 1 :].decode("utf-8", "replace")
    if text.strip():
        tail.append(text)
        records.add(text, began, ended, now, redrawn=b"\r" in drawn)


class _After(enum.Enum):
    """Where a record's last line leaves it, which says what may continue it (`_continued`)."""

    LINE = enum.auto()  # a line of its own
    FRAMES = enum.auto()  # a traceback's header or frames, an exception group's lines: an unindented line ends them
    EXCEPTION = enum.auto()  # the exception line that ends a traceback's frames, or a line of its message
    GROUP_END = enum.auto()  # an exception group's end: only more of the group (a nested group ends in its parent)


@dataclass
class _Record:
    lines: list[str]
    level: int
    due: float  # when it is logged, whatever comes after
    logged: bool  # its first line names its level: a line vlmops logged, which logging writes with its traceback
    ended: int  # the read (of copy_output) that ended its last line
    after: _After


class _Records:
    """The records a child's finished lines make, each logged once through `logger` at its first line's level, its
    text the lines joined with newlines.

    The lines a rank prefix marks (`_RANK_PREFIX`) make records apart from the others': torchrun's ranks write at once,
    their lines interleaved in one stream. In each such stream, a line continues the record before it when it comes
    within GROUP_WAIT_S of that record's first line, is no progress bar's, and is
    - a traceback's header (an exception group's included) after a line at ERROR (logging.exception, a chained
      exception), or written with a logged line at a lower level (`exc_info=True`: logging writes both in one write);
    - a chained exception's "During handling ..." or "The above exception ..." line;
    - in a traceback, an exception group's line; after the group's end, nothing else;
    - in a traceback's frames, an indented line, or the exception line that ends them (the first unindented one)
      unless it names a level;
    - after that exception line, a line written with the line before it that names no level: the rest of a multi-line
      message, as pydantic's or torchrun's ChildFailedError summary (`====` framed, unindented);
    - after any other line, an indented line written with it: a multi-line warning's source line, an error's `  - `
      items.
    "Written with" the line before: it began in the read (of copy_output) that ended that line. The child wrote both at
    once, as logging writes a record and Python an exception's message, where a print of its own comes in a read of
    its own (unless the child wrote it before copy_output read the lines before it, which then joins their record).
    Any other line starts a record: a traceback's header one at ERROR (an uncaught exception: after a print or an INFO
    line it is the crash that follows them, not theirs); the others one at the level they name (`line_level`). A
    record waits no longer than GROUP_WAIT_S for its lines: logged when a line starts another in its stream, when its
    time is up (copy_output waits for the next read no longer), or when the child ends."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.open: dict[str, _Record] = {}  # by the rank prefix of their lines ("" for none)

    @property
    def due(self) -> float | None:
        """When the first of the open records is logged; None if none is open."""
        return min((record.due for record in self.open.values()), default=None)

    def add(self, line: str, began: int, ended: int, now: float, redrawn: bool = False) -> None:
        """Add a finished line that began in read `began` and ended in read `ended` (copy_output's) at `now`."""
        prefix = prefixed[0] if (prefixed := _RANK_PREFIX.match(line)) else ""
        text = line[len(prefix) :]
        record = self.open.get(prefix)
        if record is not None and now < record.due and not redrawn and (after := _continued(record, text, began)):
            record.lines.append(line)
            record.ended, record.after = ended, after
            return
        if record is not None:
            self._log(self.open.pop(prefix))
        header = _TRACEBACK.match(text) is not None
        self.open[prefix] = _Record(
            lines=[line],
            level=logging.ERROR if header else line_level(text),
            due=now + GROUP_WAIT_S,
            logged=_LOGGED_LEVEL.match(text) is not None,
            ended=ended,
            after=_After.FRAMES if header else _After.LINE,
        )

    def log(self, until: float = math.inf) -> None:
        """Log the open records due by `until` (all by default), the earliest first."""
        for prefix, record in sorted(self.open.items(), key=lambda item: item[1].due):
            if record.due <= until:
                self._log(self.open.pop(prefix))

    def _log(self, record: _Record) -> None:
        self.logger.log(record.level, "%s", "\n".join(record.lines))


def _continued(record: _Record, text: str, began: int) -> _After | None:
    """Where `text` (a line without its rank prefix, which began in read `began`) leaves `record` if it continues it;
    None if it starts a record (the rules: `_Records`)."""
    written_with = began == record.ended
    if _TRACEBACK.match(text):
        return _After.FRAMES if record.level >= logging.ERROR or (written_with and record.logged) else None
    if text in _CHAINED:
        return record.after
    if record.after is not _After.LINE and (group := _GROUP_LINE.match(text)):
        return _After.GROUP_END if group[1] else _After.FRAMES
    if record.after is _After.FRAMES:
        if text[:1].isspace():
            return _After.FRAMES
        return None if _LOGGED_LEVEL.match(text) else _After.EXCEPTION
    if record.after is _After.EXCEPTION and written_with and not _LOGGED_LEVEL.match(text):
        return _After.EXCEPTION
    if record.after is _After.LINE and written_with and text[:1].isspace():
        return _After.LINE
    return None


def child_output_logger() -> logging.Logger:
    """CHILD_OUTPUT_LOGGER, set up for the lines `copy_output` has written to stderr already: it does not propagate
    (the console's handlers would print each line twice), and a NullHandler keeps logging's last resort from printing
    its warnings again where no caller put a handler on it. Set up here rather than at import: a logging config loaded
    later (Prefect's, a team's that names `vlmops`) resets the loggers under those it names."""
    logger = logging.getLogger(CHILD_OUTPUT_LOGGER)
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def line_level(text: str) -> int:
    """The level a line of a child's output names (`_LOGGED_LEVEL`), else INFO."""
    if named := _LOGGED_LEVEL.match(text):
        return logging.getLevelNamesMapping()[named[1]]
    if _ERROR_LINE.match(text):
        return logging.ERROR
    if _PYTHON_WARNING.match(text):
        return logging.WARNING
    return logging.INFO


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child's process group: SIGTERM, then SIGKILL after STOP_GRACE_S."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tied_to_this_process(command: list[str]) -> list[str]:
    """`command`, started so that it dies with this process (Linux); elsewhere unchanged."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-m", "vlmops.train.child", str(os.getpid()), "--", *command]


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; a no-op elsewhere).

    If the parent is already gone (it died before the request took effect), exit at once: nobody waits for us.
    """
    if not sys.platform.startswith("linux"):
        return
    # The signal follows the *thread* that started this process: each starter (run_child, vlmops.infer.parallel) blocks
    # that thread until we exit, so it outlives us unless the whole caller dies, which is the case this is for.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("could not tie this process to its parent (prctl errno %d)", ctypes.get_errno())
        return
    expected = parent_pid if parent_pid is not None else os.getppid()
    if os.getppid() != expected:
        os._exit(1)


def _exec_tied(argv: list[str]) -> None:
    """`python -m vlmops.train.child PARENT_PID -- COMMAND...`: die with PARENT_PID, then become COMMAND."""
    parent, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: python -m vlmops.train.child PARENT_PID -- COMMAND [ARGS...]")
    die_with_parent(int(parent))
    os.execvp(command[0], command)  # the death signal request survives exec


if __name__ == "__main__":
    _exec_tied(sys.argv[1:])
