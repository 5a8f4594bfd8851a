"""One run of a batch inference job at a time: the process that coordinates a run (`vlmops batch-infer`, the
batch-inference flow's job) holds the job's output for the whole run, and another run of the job refuses at once,
naming the first (its pid, host, start and command line) and what to do.

Two runs at once would each answer every shard not done yet: the parts stay right (each is published whole), but the
GPU work is doubled and both runs' progress and summaries are wrong. The processes that answer a run's shards for it
(a process per GPU, a distributed job's task workers) hold nothing: they work for the run that holds the output.

- A local output: an flock (filelock) on `_job/run.lock`, into which the holder writes who it is. The kernel drops the
  lock when the holder ends, however it ends: a run killed outright (SIGKILL, the OOM killer) leaves no stale lock.
- An `s3://` output: a lease object, `_job/lease.json`, written only where there is none (a conditional PUT,
  `If-None-Match: *`, which AWS S3 and SeaweedFS honour, races included), renewed every LEASE_RENEW_S by its holder
  (`If-Match` its last ETag) and deleted when the run ends. A run killed outright cannot delete it: the next run takes
  it over at once where the holder was a run of its own machine that is over (same boot and pid namespace, and no
  such pid: an OOM-killed job step retried; or this process, whose run ended while S3 was away), else once it has not
  been renewed for LEASE_STALE_S (by the server's clock). On a server that ignores conditional
  writes, a second run at once is not detected; the run says so in a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from vlmops.errors import RunFailed, UserInputError
from vlmops.infer.output import JOB_FILE, JobOutput, LocalOutput, S3Output
from vlmops.scratch import KERNEL

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

log = logging.getLogger(__name__)

RUN_LOCK = "_job/run.lock"
LEASE = "_job/lease.json"
LEASE_RENEW_S = 30.0
LEASE_STALE_S = 120.0
"""A lease not renewed for this long (four renewals missed) is a dead run's and is taken over."""
COMMAND_CHARS = 500
_HELD_HERE: set[str] = set()
"""The tokens of the leases this process holds now (`_leased`): one of its own that is not is an ended run's."""


class JobRunningError(UserInputError):
    """Another run of the job holds its output (exit 2); the message names it and says what to do."""

    def __init__(self, message: str, holder: RunHolder | None = None):
        super().__init__(message)
        self.holder = holder
        """The run that holds it, where it has said (None: a lock being written, a lease of another tool)."""


@dataclass(frozen=True)
class RunHolder:
    """Who holds a job's output: written into the lock file or the lease."""

    pid: int
    host: str
    started_at: str
    command: str
    token: str = ""
    """This hold's own id (a lease read back after a retried PUT is known as this run's own)."""
    kernel: str = ""
    """The boot id of the holder's kernel and its pid namespace (`_this_machine`): where both are this process's, its
    pid is one this process can look up."""

    def has_ended(self) -> bool:
        """Whether the holder is a run of this machine (this boot, this pid namespace) that is over: its process is
        gone, or it is this process and the run has ended (its lease left where S3 was away as it ended). False where
        that cannot be told: another machine's, another container's, an older vlmops's lease, a pid in use again."""
        if not self.kernel or self.kernel != _this_machine() or self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return self.token not in _HELD_HERE
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # there, another user's
            return False
        return False

    @classmethod
    def this_process(cls, run_by: str | None = None) -> RunHolder:
        command = run_by or shlex.join(sys.orig_argv)
        return cls(
            os.getpid(),
            socket.gethostname(),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            command[:COMMAND_CHARS],
            uuid.uuid4().hex,
            _this_machine(),
        )

    @classmethod
    def from_text(cls, text: str | None) -> RunHolder | None:
        """The holder a lock file or lease names; None where it names none (being written, or not ours)."""
        try:
            fields = json.loads(text or "")
            return cls(
                **{k: fields[k] for k in ("pid", "host", "started_at", "command", "token")},
                kernel=fields.get("kernel", ""),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def to_text(self) -> str:
        return json.dumps(asdict(self)) + "\n"


@contextmanager
def hold_job_run(output: JobOutput, run_by: str | None = None) -> Iterator[None]:
    """Hold `output` for this run of its job until the block exits; `run_by` names the run in the message another run
    gets (default: this process's command line).

    Raises:
        JobRunningError: another run of the job holds it now.
    """
    holder = RunHolder.this_process(run_by)
    if isinstance(output, LocalOutput):
        with _locked(output, holder):
            yield
    elif isinstance(output, S3Output):
        with _leased(output, holder):
            yield
    else:
        raise TypeError(f"no run lock for {type(output).__name__}")


def refuse_if_running(output: JobOutput) -> None:
    """Refuse now if another run of the job holds `output` (before anything slow: resolving, hashing, planning), taking
    nothing and writing nothing. The run holds it later (`hold_job_run`), which refuses a run that starts meanwhile.

    Raises:
        JobRunningError: another run of the job holds it now.
    """
    if isinstance(output, LocalOutput):
        lock_file = output.root / RUN_LOCK
        if lock_file.is_file():
            with _locked(output, None):
                pass
    elif isinstance(output, S3Output):
        lease = _Lease(output, None)
        found = lease.read()
        if found is not None and found.live():
            raise JobRunningError(lease.held_by(found), found.holder)


@dataclass(frozen=True)
class RunGoingOn:
    """Whether a run of a job holds its output now (None: that could not be read), and who holds it (None where it
    has not said: a lock being written, a lease of another tool)."""

    running: bool | None
    holder: RunHolder | None = None

    def as_dict(self) -> dict[str, Any] | None:
        return asdict(self.holder) if self.holder is not None else None


def run_going_on(output: JobOutput) -> RunGoingOn:
    """Whether a run of the job in `output` holds it now, and who: read only, nothing taken for longer than the look,
    nothing written (`vlmops batch-status`). Not from the process holding it: its own hold reads as another's."""
    try:
        refuse_if_running(output)
    except JobRunningError as running:
        return RunGoingOn(True, running.holder)
    except Exception as err:  # a folder not ours to write, a bucket not ours to read: where it stands, without it
        log.warning("output %s: whether a run holds it now could not be read: %s", output.uri, err)
        return RunGoingOn(None)
    return RunGoingOn(False)


def _named_in(lock_file: Path) -> RunHolder | None:
    """The holder a held lock file names (filelock opens it without truncating it, 4.x: what the holder wrote)."""
    return RunHolder.from_text(lock_file.read_text(encoding="utf-8", errors="replace"))


@contextmanager
def _locked(output: LocalOutput, holder: RunHolder | None) -> Iterator[None]:
    """The flock on the output's run lock, with `holder` written into it (None: only checked, nothing written)."""
    lock_file = output.root / RUN_LOCK
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        found = _named_in(lock_file)
        raise JobRunningError(_held_message(output, found, f"`lsof {lock_file}` lists it"), found) from None
    try:
        if holder is not None:
            # Through a descriptor of its own: the flock is on filelock's, which closing this one leaves held.
            fd = os.open(lock_file, os.O_WRONLY)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, holder.to_text().encode("utf-8"))
            finally:
                os.close(fd)
        yield
    finally:
        lock.release()


def _held_message(output: JobOutput, holder: RunHolder | None, unnamed: str, age: str = "") -> str:
    """What a run refused because another holds the job's output is told: which job, which run, what to do."""
    job = _job_id(output)
    named = f"job {job}" if job else "this job"
    status = f"`vlmops batch-status {output.uri}` says how far it got"
    if holder is None:
        return (
            f"output {output.uri}: another run of {named} is going on (it has not said which yet; {unnamed}); two runs "
            f"at once would answer the same shards twice. Wait for it to end ({status}), or stop it, then run the same "
            "command again"
        )
    return (
        f"output {output.uri}: another run of {named} is going on: pid {holder.pid} on {holder.host}, since "
        f"{holder.started_at}{age}: {holder.command}. Two runs at once would answer the same shards twice. Wait for it "
        f"to end ({status}), or stop it (`kill {holder.pid}` on {holder.host}: it stops in order and the parts it "
        "wrote are kept), then run the same command again"
    )


def _job_id(output: JobOutput) -> str | None:
    """The id of the job planned in `output`, where one is (a read that fails names none: the message goes on)."""
    from vlmops.infer.job_plan import JobPlan

    try:
        saved = output.read_text(JOB_FILE)
        return JobPlan.from_json(saved).job_id if saved else None
    except Exception:
        return None


@dataclass(frozen=True)
class _Found:
    holder: RunHolder | None
    etag: str
    age_s: float
    """Seconds since it was last written, by the server's clock (its Date against the object's LastModified)."""

    def live(self) -> bool:
        """Whether its run may still be going on: renewed within LEASE_STALE_S, by a process not known to be gone."""
        return self.age_s <= LEASE_STALE_S and not (self.holder is not None and self.holder.has_ended())


class _Lease:
    """The S3 lease of a job's output: taken, renewed in a thread of its own, and deleted."""

    def __init__(self, output: S3Output, holder: RunHolder | None):
        self.output = output
        self.client = output.client
        self.bucket = output.bucket
        self.key = f"{output.prefix}/{LEASE}" if output.prefix else LEASE
        self.holder = holder
        self.etag: str | None = None
        self.stop = threading.Event()
        self.renewer: threading.Thread | None = None

    def read(self) -> _Found | None:
        """The lease as it is now; None where there is none."""
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        text = bytes(got["Body"].read()).decode("utf-8", errors="replace")
        now = parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        modified: datetime = got["LastModified"]
        return _Found(RunHolder.from_text(text), got["ETag"], (now - modified).total_seconds())

    def held_by(self, found: _Found) -> str:
        age = f" (its lease renewed {found.age_s:.0f} s ago)"
        unnamed = f"s3://{self.bucket}/{self.key} names no run"
        return _held_message(self.output, found.holder, unnamed, age) + (
            f"; a run killed outright keeps its lease until {LEASE_STALE_S:.0f} s after its last renewal, then the "
            "next run takes it over"
        )

    def take(self) -> bool:
        """Take the lease, or take over a dead run's; False where the server ignores conditional writes.

        Raises:
            JobRunningError: a live run holds it.
        """
        assert self.holder is not None
        for _ in range(3):
            try:
                self.etag = self._put(IfNoneMatch="*")
                return self._conditions_honoured()
            except _client_error() as err:
                if _status(err) == 409:  # a conflicting write at the same moment: look again
                    continue
                if _status(err) != 412:
                    raise
            found = self.read()
            if found is None:  # deleted since: its run ended
                continue
            if found.holder is not None and found.holder.token == self.holder.token:  # a retried PUT of ours
                self.etag = found.etag
                return True
            if found.live():
                raise JobRunningError(self.held_by(found), found.holder)
            try:
                self.etag = self._put(IfMatch=found.etag)
            except _client_error() as err:
                if _status(err) in (404, 409, 412):  # taken over, renewed or ended meanwhile: look again
                    continue
                raise
            named = f"pid {found.holder.pid} on {found.holder.host}" if found.holder else "unnamed"
            if found.age_s <= LEASE_STALE_S:
                why = f"its process, {named}, has ended: killed outright"
            else:
                why = f"it stopped renewing it {found.age_s:.0f} s ago ({named}): killed outright, or its machine lost"
            log.warning("output %s: took over the lease of a run that holds it no more: %s", self.output.uri, why)
            return True
        raise RunFailed(
            f"output {self.output.uri}: the lease s3://{self.bucket}/{self.key} changed at each of 3 tries to take it; "
            "another run is starting or ending there: run the same command again in a minute"
        )

    def _conditions_honoured(self) -> bool:
        """Whether the server refuses a second conditional create of the lease (a server that ignores the header
        would let two runs each take it)."""
        try:
            self.etag = self._put(IfNoneMatch="*")
        except _client_error() as err:
            if _status(err) in (409, 412):
                return True
            raise
        log.warning(
            "output %s: the S3 server ignores conditional writes (If-None-Match): a second run of this job started "
            "while this one runs is not detected; start one run at a time",
            self.output.uri,
        )
        return False

    def _put(self, **condition: str) -> str:
        assert self.holder is not None
        body = self.holder.to_text().encode("utf-8")
        put = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)  # type: ignore[arg-type]
        return str(put["ETag"])

    def renew_in_background(self) -> None:
        self.renewer = threading.Thread(target=self._renew, name="job-lease", daemon=True)
        self.renewer.start()

    def _renew(self) -> None:
        while not self.stop.wait(LEASE_RENEW_S):
            assert self.etag is not None
            try:
                self.etag = self._put(IfMatch=self.etag)
            except _client_error() as err:
                if _status(err) not in (404, 412):
                    log.warning(
                        "output %s: lease not renewed (tried again in %.0f s): %s", self.output.uri, LEASE_RENEW_S, err
                    )
                    continue
                log.error(
                    "output %s: another run took this run's lease over (not renewed for %.0f s: this process was held "
                    "up, or S3 was away): both now answer the job's shards; stop one of them",
                    self.output.uri,
                    LEASE_STALE_S,
                )
                return
            except Exception as err:  # the connection: the next renewal may get through
                log.warning(
                    "output %s: lease not renewed (tried again in %.0f s): %s", self.output.uri, LEASE_RENEW_S, err
                )

    def release(self) -> None:
        """Stop renewing and delete the lease where it is still this run's."""
        self.stop.set()
        if self.renewer is not None:  # mid-PUT to a server that does not answer, it is not waited for past its turn
            self.renewer.join(timeout=LEASE_RENEW_S)
        if self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as err:  # never over the run's own end: the lease goes stale instead
            log.warning(
                "output %s: the lease s3://%s/%s was not deleted (%s): the next run of the job takes it over once it "
                "is %.0f s old",
                self.output.uri,
                self.bucket,
                self.key,
                err,
                LEASE_STALE_S,
            )


@contextmanager
def _leased(output: S3Output, holder: RunHolder) -> Iterator[None]:
    lease = _Lease(output, holder)
    if lease.take():
        lease.renew_in_background()
    _HELD_HERE.add(holder.token)
    try:
        yield
    finally:
        _HELD_HERE.discard(holder.token)
        lease.release()


def _client_error() -> type[ClientError]:
    from botocore.exceptions import ClientError

    return ClientError


def _status(err: Any) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _this_machine() -> str:
    """This process's kernel (boot id) and pid namespace, as `RunHolder.kernel`; "" where either is unknown."""
    try:
        pid_namespace = Path("/proc/self/ns/pid").stat().st_ino
    except OSError:
        return ""
    return f"{KERNEL}:{pid_namespace}" if KERNEL else ""
