"""GPU work in a child process: training and merging run there, so the caller (a CLI, a Prefect worker) never
holds the GPU itself and gets all its memory back when the step ends.

The child starts in a process group of its own (torchrun's ranks join it): an error or Ctrl-C in the caller
stops the whole group, never leaving a rank behind on a GPU. A caller killed outright (SIGKILL, the OOM killer)
runs no clean-up, so on Linux the child is also started through `python -m vlmops.train.child PID -- COMMAND`,
which asks the kernel to kill it when its parent dies and then becomes COMMAND; each rank does the same with
its torchrun agent (`die_with_parent`). Otherwise an orphaned run would go on writing the run folder that a
rerun resumes from. A batch inference job's child and its per-GPU workers are tied the same way (vlmops.infer.parallel).

What a child writes is copied to the caller's stderr as it comes (the worker's console, a terminal) and each finished
line is logged once through CHILD_OUTPUT_LOGGER, which sends it nowhere unless a caller puts a handler there: a flow
run's process does (flows/__init__), so the lines reach the run's log on the Prefect server.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
from collections import deque
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
    non-blank lines in `tail` and logging each once through CHILD_OUTPUT_LOGGER (`log_child_line`).

    A progress bar redraws its line after a `\\r`: the line counts once it ends, as it was last drawn (its redraws
    went to stderr as they came)."""
    lines_out = child_output_logger()
    partial = b""
    out = getattr(sys.stderr, "buffer", None)
    while chunk := os.read(fd, 65536):
        if saved is not None:
            saved.write(chunk)
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode("utf-8", "replace"))
        *lines, partial = (partial + chunk).split(b"\n")
        for line in lines:
            _finished_line(line, tail, lines_out)
        partial = _last_redraw(partial)  # a bar that redraws for hours keeps only what it shows now
    _finished_line(partial, tail, lines_out)  # the child's last line, without its newline


def _last_redraw(line: bytes) -> bytes:
    """`line` from its last redraw on: the text after its last `\\r` but for those that end it (`\\r\\n`)."""
    drawn = line.rstrip(b"\r")
    return line[drawn.rfind(b"\r") + 1 :]


def _finished_line(line: bytes, tail: deque[str], lines_out: logging.Logger) -> None:
    text = _last_redraw(line).rstrip(b"\r").decode("utf-8", "replace")
    if text.strip():
        tail.append(text)
        log_child_line(lines_out, text)


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


def log_child_line(logger: logging.Logger, text: str) -> None:
    """Log one line of a child's output at the level it names (`_LOGGED_LEVEL`), else at INFO."""
    if named := _LOGGED_LEVEL.match(text):
        level = logging.getLevelNamesMapping()[named[1]]
    elif _ERROR_LINE.match(text):
        level = logging.ERROR
    elif _PYTHON_WARNING.match(text):
        level = logging.WARNING
    else:
        level = logging.INFO
    logger.log(level, "%s", text)


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
