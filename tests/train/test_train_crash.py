"""Crashes during training, for real: SIGKILL of `vlmops sft` at a random step, and SIGKILL while a checkpoint is
being written. `train.resume: auto` continues from the last complete checkpoint; a half-written one is never
trusted (not resumed from, not opened), and the training child never outlives a killed `vlmops sft`."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import pytest
import yaml

from vlmops.config import load_config
from vlmops.data.prepare import PreparedDataset
from vlmops.train.launch import training_command
from vlmops.train.rundir import COMPLETE_MARKER, checkpoints, incomplete_checkpoints, open_run, plan_resume
from vlmops.train.sft import TrainResult, train
from vlmops.train.trainer import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
OVERRIDES = [
    f"train.max_steps={STEPS}",
    "train.batch_size=4",
    "train.lr=5e-3",
    "train.save_steps=4",
    "train.eval_steps=8",
    "train.save_total_limit=3",
    "train.gradient_checkpointing=false",
]
PIPE_BYTES = 4096  # the smallest pipe buffer Linux allows: the writer blocks once it is full


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _wait(condition, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _logged_steps(run_dir: Path) -> list[int]:
    return [line["step"] for line in read_metrics(run_dir / "metrics.jsonl") if "loss" in line]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="named pipes with a set size are Linux")
def test_a_kill_while_a_checkpoint_is_written_leaves_nothing_trusted(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """The kill lands inside the Trainer's save of checkpoint-12: its weights are written and its optimizer state
    is half-way. The optimizer file is a named pipe with a 4 KiB buffer that nobody reads, so the save cannot get
    past it until the kill: deterministic, and the code under test runs unchanged."""
    run_dir = tmp_path / "run"
    command = training_command(None, tiny_model, snapshot.path, run_dir, OVERRIDES)
    log = tmp_path / "train.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            # The run folder is set up (what an earlier run left is cleared) before the model loads.
            _wait(lambda: (run_dir / "config.yaml").is_file(), "the run folder is set up", proc, log)
            saving = run_dir / "checkpoint-12"
            saving.mkdir()
            pipe = saving / "optimizer.pt"
            os.mkfifo(pipe)
            # Held open for reading and writing: the Trainer's open does not wait for a reader, and its writes
            # stop once the buffer is full.
            held = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)
            fcntl.fcntl(held, fcntl.F_SETPIPE_SZ, PIPE_BYTES)

            def buffered() -> int:
                count = bytearray(4)
                fcntl.ioctl(held, termios.FIONREAD, count)
                return int.from_bytes(count, sys.byteorder)

            # Bytes in the pipe: the save is inside optimizer.pt, and as its state is larger than the buffer
            # (tens of KiB), it can never get past it.
            _wait(lambda: buffered() > 0, "the save of checkpoint-12 reaches optimizer.pt", proc, log)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            os.close(held)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-4", "checkpoint-8"]
    assert incomplete_checkpoints(run_dir) == [saving]
    assert (saving / "adapter_model.safetensors").is_file() and not (saving / COMPLETE_MARKER).exists()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        open_run(saving)  # inference, eval and export refuse it too
    assert open_run(run_dir).weights == run_dir / "checkpoint-8"

    config = load_config(None, OVERRIDES)
    resumed = train(config, tiny_model, snapshot.path, run_dir)
    assert resumed.resumed_from == run_dir / "checkpoint-8"
    assert resumed.steps == STEPS and [s for s, _ in resumed.loss_history] == list(range(1, STEPS + 1))
    assert not incomplete_checkpoints(run_dir)
    rewritten = run_dir / "checkpoint-12"
    assert (rewritten / COMPLETE_MARKER).is_file() and stat.S_ISREG((rewritten / "optimizer.pt").stat().st_mode)


def test_sigkill_of_vlmops_sft_at_a_random_step_then_resume_auto(tmp_path: Path) -> None:
    """The whole `vlmops sft` process group is killed at a random step; the training child dies with it (no
    orphan writing the folder), and `vlmops sft --run-dir` again continues from the last complete checkpoint."""
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "run": {"output_dir": str(tmp_path / "outputs"), "name": "t"},
                "model": {"name": "tiny-deepseek-vl"},
                "data": {"demo": {"num_train": 48, "num_eval": 8, "image_size": 32}},
            }
        )
    )
    run_dir = tmp_path / "run"
    sets = [arg for item in OVERRIDES for arg in ("--set", item)]
    command = [
        sys.executable,
        "-m",
        "vlmops.cli",
        "sft",
        "--config",
        str(config_file),
        *sets,
        "--run-dir",
        str(run_dir),
    ]
    kill_at = random.randint(2, STEPS - 2)
    log = tmp_path / "sft.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            _wait(lambda: max(_logged_steps(run_dir), default=0) >= kill_at, f"step {kill_at}", proc, log)
            family = psutil.Process(proc.pid).children(recursive=True)
            assert family, "the training child should be running"
            os.killpg(proc.pid, signal.SIGKILL)  # the group of `vlmops sft`; the child has a group of its own
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"training processes outlived the killed vlmops sft: {alive}"
    assert not (run_dir / "result.json").exists()
    before = checkpoints(run_dir)
    expected = before[-1] if before else None
    assert plan_resume(run_dir, load_config(config_file, OVERRIDES), open_info(run_dir)).checkpoint == expected

    rerun = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert rerun.returncode == 0, f"killed at step {kill_at}:\n{rerun.stderr[-3000:]}"
    result = TrainResult.from_run_dir(run_dir)
    assert result.resumed_from == (expected.resolve() if expected else None), f"killed at step {kill_at}"
    assert result.steps == STEPS and [s for s, _ in result.loss_history] == list(range(1, STEPS + 1))
    assert not incomplete_checkpoints(run_dir)
    assert json.loads((run_dir / "checkpoint-16" / COMPLETE_MARKER).read_text()) == {"step": 16}


def open_info(run_dir: Path):  # type: ignore[no-untyped-def]
    from vlmops.train.rundir import RunInfo

    return RunInfo.read(run_dir, run_dir)


def test_unmarked_checkpoints_are_kept_but_several_after_the_resume_point_are_refused(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """Checkpoints without the marker that a kill cannot explain (an older vlmops wrote none) are never
    deleted: before the resume point they are kept and ignored; several after it stop the run with advice."""
    config = load_config(None, ["train.max_steps=2", "train.save_steps=1", "train.gradient_checkpointing=false"])
    run_dir = tmp_path / "r"
    first = train(config, tiny_model, snapshot.path, run_dir)
    (run_dir / "result.json").unlink()
    shutil.rmtree(first.final_dir)
    (run_dir / "checkpoint-1" / COMPLETE_MARKER).unlink()  # an old, unmarked checkpoint before the latest
    again = train(config, tiny_model, snapshot.path, run_dir)
    assert again.resumed_from == run_dir / "checkpoint-2"
    assert (run_dir / "checkpoint-1" / "adapter_model.safetensors").is_file()  # kept...
    assert run_dir / "checkpoint-1" not in checkpoints(run_dir)  # ...and never trusted

    for name in ("checkpoint-5", "checkpoint-6"):
        shutil.copytree(run_dir / "checkpoint-1", run_dir / name)
    with pytest.raises(ValueError, match=r"2 checkpoints without the checkpoint-complete marker \(checkpoint-5, "):
        train(config, tiny_model, snapshot.path, run_dir)
    assert (run_dir / "checkpoint-5").is_dir() and (run_dir / "checkpoint-6").is_dir()
