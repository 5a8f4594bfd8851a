"""GPU work in a child process: training and merging run there, so the caller (a CLI, a Prefect worker) never
holds the GPU itself and gets all its memory back when the step ends.

The child starts in a process group of its own (torchrun's ranks join it): an error or Ctrl-C in the caller
stops the whole group, never leaving a rank behind on a GPU.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from vlmops.multigpu import NO_MULTICAST_ENV

log = logging.getLogger(__name__)

TAIL_LINES = 60
STOP_GRACE_S = 30


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
    partial = b""
    out = getattr(sys.stderr, "buffer", None)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_environment(extra_env),
        start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        with log_file.open("ab") as saved:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                saved.write(chunk)
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stderr.write(chunk.decode("utf-8", "replace"))
                lines = (partial + chunk).replace(b"\r", b"\n").split(b"\n")
                partial = lines.pop()
                tail.extend(line.decode("utf-8", "replace") for line in lines if line.strip())
        returncode = proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    if partial.strip():
        tail.append(partial.decode("utf-8", "replace"))
    return returncode, "\n".join(tail)


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
