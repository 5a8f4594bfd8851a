"""SIGTERM and SIGHUP as an orderly stop, the way Ctrl-C is one: raised in the main thread as `StopSignal`, as SIGINT
raises `KeyboardInterrupt`, so that `finally` blocks run, the processes a command started are stopped and it says
where it left its work.

SIGTERM is how `timeout`, systemd, Kubernetes (an evicted or deleted pod), Slurm's preemption and `kill` stop a
process; SIGHUP, a closed terminal. Left to their default, Python dies at once: no clean-up, no message. A signal
ignored when the command starts (`nohup` ignores SIGHUP) stays ignored.

A stopped command ends with `exit_now`: its exit status says which signal stopped it (128 + the signal's number:
130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP, as a shell reports a process the signal killed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class StopSignal(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException, as KeyboardInterrupt is: an `except Exception` on the way out must
    not take it for an error and carry on."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(stop: BaseException) -> int:
    """The exit status of a command stopped by `stop` (KeyboardInterrupt or StopSignal): 128 + the signal's number."""
    return 128 + (stop.signum if isinstance(stop, StopSignal) else signal.SIGINT)


def stop_reason(stop: BaseException) -> str:
    """How `stop` came, in words: `interrupted` (Ctrl-C), `terminated: SIGTERM`, `hung up: SIGHUP`."""
    if not isinstance(stop, StopSignal):
        return "interrupted"
    return f"{'hung up' if stop.signum == signal.SIGHUP else 'terminated'}: {signal.Signals(stop.signum).name}"


@contextlib.contextmanager
def stop_signals_raised() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `StopSignal` in the main thread (each only where its disposition is
    the default); the handlers before are put back after it. Elsewhere than in the main thread, nothing changes (Python
    runs signal handlers there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in before.items():
        if handler == signal.SIG_DFL:
            signal.signal(signum, _raise_stop)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    # A second stop signal ends the process at once, as their default does: the first one's clean-up may be what hangs.
    for each in STOP_SIGNALS:
        if signal.getsignal(each) is _raise_stop:
            signal.signal(each, signal.SIG_DFL)
    if signum == signal.SIGHUP:
        _away_from_a_closed_terminal()
    raise StopSignal(signum)


def _away_from_a_closed_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal that hung up: a character device that is no
    longer a terminal fails every write (EIO), which would fail the clean-up's progress bar and messages. A file or
    a pipe they are redirected to still takes them."""
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.fstat(fd).st_mode) and not os.isatty(fd):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)


def exit_now(status: int) -> NoReturn:
    """End a stopped command's process with `status` once what it printed and logged is out, without waiting on its
    threads: one reading the job's input from a server that does not answer would hold Python's exit for its timeout
    (`storage.url_timeout_s`, retried: minutes), and a stop must end in seconds. Whatever must be removed (scratch
    folders, part files being written) is removed before, as the stop unwinds."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    logging.shutdown()
    os._exit(status)
