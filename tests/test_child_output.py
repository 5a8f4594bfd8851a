"""A step's child process (training and merge through run_child, a batch inference job through run_in_process_group)
writes to the console as before, and each of its finished lines reaches the flow run's log on the Prefect server (the
UI's) once, at the level the line names, with credentials masked: a progress bar as it was last drawn, no blank line, a
traceback in one record with the line it follows (an uncaught exception's at ERROR), its whole message and an exception
group's lines included, each torchrun rank's apart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vlmops.redact import RedactingFilter
from vlmops.train.child import CHILD_OUTPUT_LOGGER, GROUP_WAIT_S, child_output_logger, copy_output, run_child

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_childsecret1234"  # HF_TOKEN, in the environment the child inherits

# A child that writes as vlmops's processes do (the formats of quiet.child_logging and `vlmops`), an error logged with
# its traceback, a tqdm-like bar of four redraws, blank lines, a credential, a Python warning, `vlmops`'s error line
# and a last line without a newline; each write flushed on its own, so that lines and redraws reach the copier in
# pieces.
CHILD = r"""
import os, sys, time
name = sys.argv[1]
def write(text):
    sys.stderr.write(text)
    sys.stderr.flush()
    time.sleep(0.02)
write(f"2026-12-01 10:00:00,123 WARNING vlmops.infer.job_plan: {name}: 2 prompts are longer than infer.max_context\n")
write(f"10:00:01 INFO vlmops.infer.batch_job: {name}: started in 0.1 s\n")
write(f"10:00:02 ERROR vlmops.infer.batch_job: {name}: a batch failed\nTraceback (most recent call last):\n"
      f'  File "/opt/job.py", line 3, in run\n    step()\nValueError: {name}: bad batch\n')
for done in range(4):
    write(f"\r{name} job:  {100 * done // 3}%| {done}/3 [00:0{done}<00:00]")
write("\n\n  \n")
write(f"{name} logs in with {os.environ['HF_TOKEN']}\n")
write(f"/opt/lib/thing.py:12: UserWarning: {name} is deprecated\n")
write(f"error: {name} failed\n")
write(f"{name}: the last line, unfinished")
"""


def _lines(name: str, token: str = TOKEN) -> list[tuple[int, str]]:
    """What the child above writes, as finished lines with their levels."""
    return [
        (logging.WARNING, f"2026-12-01 10:00:00,123 WARNING vlmops.infer.job_plan: {name}: 2 prompts are longer than "
                          "infer.max_context"),
        (logging.INFO, f"10:00:01 INFO vlmops.infer.batch_job: {name}: started in 0.1 s"),
        (logging.ERROR, f"10:00:02 ERROR vlmops.infer.batch_job: {name}: a batch failed\nTraceback (most recent call "
                        f'last):\n  File "/opt/job.py", line 3, in run\n    step()\nValueError: {name}: bad batch'),
        (logging.INFO, f"{name} job:  100%| 3/3 [00:03<00:00]"),
        (logging.INFO, f"{name} logs in with {token}"),
        (logging.WARNING, f"/opt/lib/thing.py:12: UserWarning: {name} is deprecated"),
        (logging.ERROR, f"error: {name} failed"),
        (logging.INFO, f"{name}: the last line, unfinished"),
    ]  # fmt: skip


def _run_logs(flow_run_id: Any) -> list[Any]:
    """Every log record the server keeps of the flow run (its tasks' included)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


@pytest.mark.integration
def test_a_child_s_lines_reach_the_flow_run_s_log_once(
    prefect_harness: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flow that runs one child as the batch-inference flow does (run_in_process_group, in the flow: its copier is a
    thread of its own) and one as training does (run_child, in a task). Before, the server had none of their lines."""
    from prefect import flow, task

    import flows  # noqa: F401  (what a worker's flow run loads: the handlers that send vlmops's lines to the server)
    from vlmops.infer.parallel import run_in_process_group
    from vlmops.train.child import run_child

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # A worker's flow run logs vlmops's lines from INFO (flows/__init__); a `vlmops` command run earlier in this test
    # process (quiet.configure) leaves them to the root logger's WARNING, which dropped the INFO lines here.
    caplog.set_level(logging.INFO, logger="vlmops")

    @task
    def train_like() -> int:
        return run_child([sys.executable, "-c", CHILD, "training"], tmp_path / "train.log")[0]

    @flow
    def children() -> int:
        run_in_process_group([sys.executable, "-c", CHILD, "job"])
        return train_like()

    state = children(return_state=True)
    assert state.is_completed(), state
    logs = [log for log in _run_logs(state.state_details.flow_run_id) if log.name == CHILD_OUTPUT_LOGGER]
    masked = {name: _lines(name, "***") for name in ("job", "training")}
    in_the_flow = sorted((log.level, log.message) for log in logs if log.task_run_id is None)
    in_the_task = sorted((log.level, log.message) for log in logs if log.task_run_id is not None)
    assert (in_the_flow, in_the_task) == (sorted(masked["job"]), sorted(masked["training"])), logs
    # The console as before: all the child wrote, redraws and the credential included (the child's own logging masks
    # it in what vlmops logs), and no line a second time.
    console = capfd.readouterr().err
    for name in ("job", "training"):
        for _, line in _lines(name):
            assert console.count(line) == 1, (line, console[-3000:])
        assert console.count(f"\r{name} job:  33%| 1/3 [00:01<00:00]") == 1, console[-3000:]
    assert (tmp_path / "train.log").read_text().count("training: the last line, unfinished") == 1


def test_a_command_prints_a_child_s_lines_once(tmp_path: Path) -> None:
    """Under a command (no Prefect, the root's handler as `vlmops` configures it), the child's lines are printed once,
    by the copy of its output: not again through the root's handler, nor by logging's last resort (which prints the
    warnings of a logger whose records reach no handler)."""
    script = (
        "import logging, sys; from pathlib import Path; from vlmops.train.child import run_child; "
        "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
        "print(run_child([sys.executable, '-c', sys.argv[1], 'command'], Path(sys.argv[2]))[0])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": TOKEN}
    command = [sys.executable, "-c", script, CHILD, str(tmp_path / "child.log")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr[-3000:]
    for _, line in _lines("command"):
        assert done.stderr.count(line) == 1, (line, done.stderr)
    assert CHILD_OUTPUT_LOGGER not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("extra_loggers", "to_the_server"),
    [("", True), ("vlmops", True), ("flows,vlmops.infer", False), ("vlmops.child", False)],
)
def test_a_team_s_extra_loggers_say_whether_a_child_s_lines_go_to_the_server(
    extra_loggers: str, to_the_server: bool
) -> None:
    """Where PREFECT_LOGGING_EXTRA_LOGGERS names `vlmops`, Prefect's API handler there does not reach the child's lines
    (their logger does not propagate): they get a handler of their own. A list of other loggers
    leaves them out, as it leaves out the rest of vlmops's lines."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS, temporary_settings

    import flows

    logger = logging.getLogger(CHILD_OUTPUT_LOGGER)
    before = list(logger.handlers)
    try:
        for handler in before:
            logger.removeHandler(handler)
        with temporary_settings({PREFECT_LOGGING_EXTRA_LOGGERS: extra_loggers}):
            flows._own_lines_to_the_run(0, {})
        api = [h for h in logger.handlers if isinstance(h, APILogHandler)]
        assert len(api) == int(to_the_server), logger.handlers
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in before:
            logger.addHandler(handler)


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def logged(self) -> list[tuple[int, str]]:
        return [(record.levelno, record.getMessage()) for record in self.records]


@pytest.fixture
def kept() -> Iterator[_Kept]:
    """The records logged through CHILD_OUTPUT_LOGGER, at every level (a flow run's process gives it INFO)."""
    logger = child_output_logger()
    handler, level = _Kept(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# A training-like child: logged lines (quiet.child_logging's format), an error logged with its traceback, a warning
# logged with one (exc_info=True), a Python warning (with its source line), a bar stopped at 66% (its line starts with
# spaces, as tqdm's without a description do), a print, and the crash: an uncaught exception raised from another, which
# Python writes a line a write.
CRASHING = """
import logging, sys, warnings
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
log = logging.getLogger("vlmops.train.loop")
log.info("step 1")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("step 2 failed")
    log.warning("retrying step 2", exc_info=True)
log.info("step 2")
warnings.warn("warmup_steps is ignored")
for done in range(3):
    sys.stderr.write(f"\\r{100 * done // 3:3d}%| {done}/3")
    sys.stderr.flush()
sys.stderr.write("\\n")
print("saving the checkpoint", file=sys.stderr, flush=True)


def read_config():
    raise KeyError("lr")


try:
    read_config()
except KeyError as err:
    raise ValueError("pipeline.yaml: train.lr is missing") from err
"""

WARNS_AT = CRASHING.split("\n").index('warnings.warn("warmup_steps is ignored")') + 1


def test_a_traceback_is_one_record_at_the_level_of_the_line_it_follows(tmp_path: Path, kept: _Kept) -> None:
    """A logged error's traceback is one record with its line, at ERROR; a logged warning's at WARNING; a Python
    warning is one with its source line; an uncaught exception's traceback (its cause's included) is one record at
    ERROR, not a part of the print before it; the lines around them, the bar's included, stay records of their own.
    Before, each line of a traceback was a record at INFO."""
    script = tmp_path / "train.py"
    script.write_text(CRASHING)
    returncode, tail = run_child([sys.executable, str(script)], tmp_path / "train.log")
    assert returncode == 1, tail
    logged = [(level, message.split("\n")) for level, message in kept.logged()]
    untimed = [(level, [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in lines]) for level, lines in logged]
    assert [(level, lines[0], lines[-1]) for level, lines in untimed] == [
        (logging.INFO, "INFO vlmops.train.loop: step 1", "INFO vlmops.train.loop: step 1"),
        (logging.ERROR, "ERROR vlmops.train.loop: step 2 failed", "ZeroDivisionError: division by zero"),
        (logging.WARNING, "WARNING vlmops.train.loop: retrying step 2", "ZeroDivisionError: division by zero"),
        (logging.INFO, "INFO vlmops.train.loop: step 2", "INFO vlmops.train.loop: step 2"),
        (
            logging.WARNING,
            f"{script}:{WARNS_AT}: UserWarning: warmup_steps is ignored",
            '  warnings.warn("warmup_steps is ignored")',
        ),
        (logging.INFO, " 66%| 2/3", " 66%| 2/3"),
        (logging.INFO, "saving the checkpoint", "saving the checkpoint"),
        (logging.ERROR, "Traceback (most recent call last):", "ValueError: pipeline.yaml: train.lr is missing"),
    ], logged
    crash = logged[-1][1]
    assert "KeyError: 'lr'" in crash and "The above exception was the direct cause of the following exception:" in crash
    # Nothing lost, nothing twice: the records are the output's lines, blank ones aside; the tail is as before.
    written = (tmp_path / "train.log").read_bytes().decode().split("\n")
    lines = [line.split("\r")[-1] for line in written if line.split("\r")[-1].strip()]
    assert [line for _, record in logged for line in record] == lines
    assert tail.split("\n") == lines


def _copied(pieces: list[bytes], kept: _Kept, pause_s: float) -> tuple[list[tuple[int, str]], list[str]]:
    """What copy_output logs (and keeps in its tail) of `pieces`, written to a pipe `pause_s` apart, each read apart."""
    read_end, write_end = os.pipe()
    tail: deque[str] = deque(maxlen=100)
    copier = threading.Thread(target=copy_output, args=(read_end, tail))
    copier.start()
    try:
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(pause_s)
            os.write(write_end, piece)
    finally:
        os.close(write_end)
        copier.join(timeout=10)
        os.close(read_end)
    return kept.logged(), list(tail)


LOGGED_ERROR = (
    b"10:00:02 ERROR vlmops.train.loop: step 2 failed\nTraceback (most recent call last):\n"
    b'  File "/opt/loop.py", line 9, in step\n    loss = model(batch)\n           ^^^^^^^^^^^^\n'
)
ITS_END = b'  File "/opt/model.py", line 4, in forward\n    raise ValueError("bad batch")\nValueError: bad batch\n'


def test_a_traceback_split_between_two_reads_is_one_record(kept: _Kept) -> None:
    """The child's traceback reaches the copier in two reads (two writes 0.1 s apart): still one record."""
    logged, tail = _copied([LOGGED_ERROR, ITS_END, b"10:00:03 INFO vlmops.train.loop: step 3\n"], kept, 0.1)
    assert logged == [
        (logging.ERROR, (LOGGED_ERROR + ITS_END).decode().rstrip("\n")),
        (logging.INFO, "10:00:03 INFO vlmops.train.loop: step 3"),
    ]
    assert tail == [*(LOGGED_ERROR + ITS_END).decode().split("\n")[:-1], "10:00:03 INFO vlmops.train.loop: step 3"]


def test_a_record_waits_no_longer_than_group_wait_s(kept: _Kept) -> None:
    """A record is logged GROUP_WAIT_S after its first line though the child goes on (quietly): its traceback's lines
    that come later are records of their own, none lost."""
    read_end, write_end = os.pipe()
    copier = threading.Thread(target=copy_output, args=(read_end, deque()))
    copier.start()
    try:
        os.write(write_end, LOGGED_ERROR)
        deadline = time.monotonic() + GROUP_WAIT_S + 5
        while not kept.records and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kept.logged() == [(logging.ERROR, LOGGED_ERROR.decode().rstrip("\n"))]
        os.write(write_end, ITS_END)
    finally:
        os.close(write_end)
        copier.join(timeout=10)
        os.close(read_end)
    assert [message for _, message in kept.logged()[1:]] == [
        '  File "/opt/model.py", line 4, in forward\n    raise ValueError("bad batch")',
        "ValueError: bad batch",
    ]


# Each rank of a real torchrun (gloo, on CPU) joins the process group and fails with a two-line message: once in a
# process group, torch.distributed's excepthook writes the traceback with `[rank0]: ` on each line (called here as for
# an uncaught exception, so that both ranks have written theirs before either exits and torchrun stops the other); the
# agent then ends with its own traceback, a ChildFailedError whose message is an unindented `====` framed summary.
RANK_FAILS = """
import sys
import torch.distributed as dist
dist.init_process_group("gloo")
try:
    raise ValueError(f"rank {dist.get_rank()}: bad batch\\nits second line")
except ValueError:
    sys.excepthook(*sys.exc_info())
dist.barrier()
sys.exit(1)
"""


def test_torchrun_s_failure_is_a_record_a_rank_and_one_for_its_summary(tmp_path: Path, kept: _Kept) -> None:
    """Each rank's prefixed traceback is one record at ERROR, its message's second line included; torchrun's is one
    record at ERROR to the summary's last `====` line. Before, each of their lines was a record at INFO but for
    torchrun's traceback up to `ChildFailedError: `."""
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    returncode, tail = run_child(torchrun, tmp_path / "train.log")
    assert returncode == 1, tail
    logged = kept.logged()
    for rank in (0, 1):
        prefix = f"[rank{rank}]: "
        records = [(level, message.split("\n")) for level, message in logged if prefix in message]
        assert len(records) == 1, logged
        level, lines = records[0]
        assert level == logging.ERROR and all(line.startswith(prefix) for line in lines), records
        assert (lines[0], lines[-2:]) == (
            f"{prefix}Traceback (most recent call last):",
            [f"{prefix}ValueError: rank {rank}: bad batch", f"{prefix}its second line"],
        ), records
    summaries = [(level, message.split("\n")) for level, message in logged if "ChildFailedError" in message]
    assert len(summaries) == 1, logged
    level, lines = summaries[0]
    assert level == logging.ERROR and lines[0] == "Traceback (most recent call last):", summaries
    exception = lines.index("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ")
    assert lines[exception + 1] == lines[-1] == "=" * 60 and "Root Cause (first observed failure):" in lines, lines
    assert not [message for _, message in logged if message == "=" * 60], logged


def _prefixed(rank: int, error: BaseException) -> list[bytes]:
    """`error`'s traceback as a rank writes it under torchrun's `--tee`: each line prefixed by torchrun's tailer
    (`[default0]:`), after the rank's own prefix (torch.distributed's excepthook: `[rank0]: `), a line a write."""
    text = "".join(traceback.format_exception(error)).rstrip("\n")
    return [f"[default{rank}]:[rank{rank}]: {line}\n".encode() for line in text.split("\n")]


def test_interleaved_ranks_tracebacks_are_a_record_each(kept: _Kept) -> None:
    """Two ranks' tracebacks written line by line, their lines alternating and a line of torchrun's own in between:
    a record at ERROR for each rank, the other line one of its own. Before, each line was a record at INFO."""
    errors = []
    for rank in (0, 1):
        try:
            raise ValueError(f"rank {rank}: bad batch")
        except ValueError as err:
            errors.append(err)
    rank0, rank1 = (_prefixed(rank, error) for rank, error in enumerate(errors))
    assert len(rank0) == len(rank1) > 3
    agent = b"W1206 10:02:26.986000 12169 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 12\n"
    alternating = [line for pair in zip(rank0, rank1, strict=True) for line in pair]
    logged, _ = _copied([*alternating[:3], agent, *alternating[3:]], kept, 0.01)
    assert sorted(logged) == sorted(
        [
            (logging.ERROR, b"".join(rank0).decode().rstrip("\n")),
            (logging.ERROR, b"".join(rank1).decode().rstrip("\n")),
            (logging.INFO, agent.decode().rstrip("\n")),
        ]
    ), logged


# A child that logs an exception group (a batch's shards failed), prints, and then dies of one, whose message's second
# line (with a credential in it) Python writes unindented where the group's other lines have their `  | ` margin.
GROUP_FAILS = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def shards(message):
    errors = []
    for shard in (1, 2):
        try:
            raise OSError(f"shard {shard}: read timed out")
        except OSError as err:
            errors.append(err)
    return ExceptionGroup(message, [*errors, ExceptionGroup("retries", [TimeoutError("3 of 3")])])


try:
    raise shards("2 shards failed")
except ExceptionGroup:
    logging.getLogger("vlmops.infer.batch_job").exception("batch 3 failed")
print("saving the parts done", file=sys.stderr, flush=True)
raise shards(f"2 shards failed\\nthe job logged in with {os.environ['HF_TOKEN']}")
"""


def test_an_exception_group_is_one_record(tmp_path: Path, kept: _Kept, monkeypatch: pytest.MonkeyPatch) -> None:
    """A logged exception group is one record at ERROR with its line; an uncaught one is one record at ERROR, its
    unindented line and masked credential included, not a part of the print before it. Before, the uncaught group
    joined the print at INFO and its unindented line was a record of its own."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    kept.addFilter(RedactingFilter())
    script = tmp_path / "job.py"
    script.write_text(GROUP_FAILS)
    returncode, tail = run_child([sys.executable, str(script)], tmp_path / "job.log")
    assert returncode == 1, tail
    logged = [(level, message.split("\n")) for level, message in kept.logged()]
    header = "  + Exception Group Traceback (most recent call last):"
    end = "      +------------------------------------"
    assert [(level, lines[:2], lines[-1]) for level, lines in logged] == [
        (logging.ERROR, [logged[0][1][0], header], end),
        (logging.INFO, ["saving the parts done"], "saving the parts done"),
        (logging.ERROR, [header, logged[2][1][1]], end),
    ], logged
    assert logged[0][1][0].endswith("ERROR vlmops.infer.batch_job: batch 3 failed"), logged
    assert "the job logged in with *** (3 sub-exceptions)" in logged[2][1], logged
    written = (tmp_path / "job.log").read_text().split("\n")
    assert [line for _, lines in logged for line in lines] == [
        line.replace(TOKEN, "***") for line in written if line.strip()
    ]


MULTI_LINE_ERROR = (
    b"10:00:02 ERROR vlmops.config: pipeline.yaml is invalid\nTraceback (most recent call last):\n"
    b'  File "/opt/config.py", line 9, in load\n    raise ValueError(errors)\n'
    b"ValueError: 2 errors\ntrain.lr\n  Input should be a number\ntrain.epochs\n  Field required\n"
)


def test_an_exception_s_message_is_one_record_with_it_a_print_after_it_not(kept: _Kept) -> None:
    """The lines of a multi-line exception message that come with its traceback (unindented, as pydantic's) are one
    record with it; a print that comes after it, indented or not, is a record of its own, and so is an indented print
    after a logged line. Before, each unindented line of the message was a record of its own and the indented prints
    joined the record before them."""
    step = b"10:00:03 INFO vlmops.train.loop: step 3\n"
    pieces = [MULTI_LINE_ERROR, b"  saving to /runs/1\n", b"saved\n", step, b"  loss 0.5\n"]
    logged, _ = _copied(pieces, kept, 0.1)
    assert logged == [
        (logging.ERROR, MULTI_LINE_ERROR.decode().rstrip("\n")),
        (logging.INFO, "  saving to /runs/1"),
        (logging.INFO, "saved"),
        (logging.INFO, step.decode().rstrip("\n")),
        (logging.INFO, "  loss 0.5"),
    ]
