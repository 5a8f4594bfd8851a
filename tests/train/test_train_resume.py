"""Kill a training process with SIGKILL after a checkpoint, resume with `train.resume: auto`, and reach
exactly the losses of an uninterrupted run; a half-written checkpoint (no completion marker) is never used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlmops.config import load_config
from vlmops.data.prepare import PreparedDataset
from vlmops.train.launch import training_command
from vlmops.train.rundir import COMPLETE_MARKER, checkpoints, remove_unfinished
from vlmops.train.sft import setup_training, train

# 4 epochs of 12 steps, a checkpoint every 4; LoRA dropout on, so the RNG state must be restored too.
OVERRIDES = [
    "train.max_steps=48",
    "train.batch_size=4",
    "train.lr=5e-3",
    "train.save_steps=4",
    "train.eval_steps=12",
    "train.save_total_limit=3",
    "train.lora.dropout=0.1",
    "train.gradient_checkpointing=false",
]


def test_resume_after_sigkill_matches_an_uninterrupted_run(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    run_dir = tmp_path / "killed"
    command = training_command(None, tiny_model, snapshot.path, run_dir, OVERRIDES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])}
    with (tmp_path / "killed.log").open("wb") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while not checkpoints(run_dir) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    done = checkpoints(run_dir)
    assert done and not (run_dir / "final").exists() and not (run_dir / "result.json").exists()
    latest = done[-1]
    assert int(latest.name.split("-")[1]) < 48

    # A checkpoint a kill interrupted while it was being written: newer, every file there but the marker
    # (written last, once every rank has saved); and a final/ folder a kill cut short while it was built aside.
    half = run_dir / "checkpoint-44"
    shutil.copytree(latest, half)
    (half / COMPLETE_MARKER).unlink()
    staged = run_dir / ".staging-final"
    shutil.copytree(latest, staged)
    assert checkpoints(run_dir)[-1] == latest

    config = load_config(None, OVERRIDES)
    resumed = train(config, tiny_model, snapshot.path, run_dir)
    assert resumed.resumed_from == latest
    assert not staged.exists()
    assert (half / COMPLETE_MARKER).is_file()  # removed at the start, then written again by the resumed run

    reference = train(config, tiny_model, snapshot.path, tmp_path / "uninterrupted")
    assert resumed.steps == reference.steps == 48
    assert [s for s, _ in resumed.loss_history] == list(range(1, 49))
    assert [loss for _, loss in resumed.loss_history] == pytest.approx(
        [loss for _, loss in reference.loss_history], abs=1e-5
    )
    assert [s for s, _ in resumed.eval_history] == [s for s, _ in reference.eval_history] == [12, 24, 36, 48]
    assert [v for _, v in resumed.eval_history] == pytest.approx([v for _, v in reference.eval_history], abs=1e-5)
    assert resumed.train_loss == pytest.approx(reference.train_loss, abs=1e-5)


def test_a_staging_file_or_link_in_a_run_folder_is_removed_and_what_a_link_points_to_kept(tmp_path: Path) -> None:
    """A plain file named `.staging-...` in a run folder (a user's, another tool's) made the start's clean-up raise
    NotADirectoryError: no run could start there. Removed with the folders, as a link is (not what it points to)."""
    run_dir = tmp_path / "run"
    (run_dir / ".staging-final").mkdir(parents=True)
    (run_dir / ".staging-final" / "adapter_model.safetensors").write_bytes(b"x")
    (run_dir / ".staging-notes").write_text("a file of that name")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not the run's")
    (run_dir / ".staging-link").symlink_to(elsewhere)
    (run_dir / "checkpoint-2").mkdir()
    (run_dir / "checkpoint-2" / COMPLETE_MARKER).write_text("")

    removed = remove_unfinished(run_dir, None)
    assert [p.name for p in removed] == [".staging-final", ".staging-link", ".staging-notes"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2"]
    assert (elsewhere / "keep").read_text() == "not the run's"


def test_resume_never_starts_over_and_a_path_must_be_a_checkpoint(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    config = load_config(None, ["train.max_steps=2", "train.gradient_checkpointing=false"])
    first = train(config, tiny_model, snapshot.path, tmp_path / "r")
    assert first.last_checkpoint == tmp_path / "r" / "checkpoint-2"
    again = load_config(None, ["train.max_steps=2", "train.gradient_checkpointing=false", "train.resume=never"])
    second = train(again, tiny_model, snapshot.path, tmp_path / "r")
    assert second.resumed_from is None and second.loss_history == first.loss_history
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        bad = load_config(None, [f"train.resume={tmp_path / 'r' / 'final'}"])
        train(bad, tiny_model, snapshot.path, tmp_path / "r2")


def test_stopped_after_the_last_checkpoint_finishes_from_it(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    config = load_config(None, ["train.max_steps=2", "train.gradient_checkpointing=false"])
    first = train(config, tiny_model, snapshot.path, tmp_path / "r")
    trained = load_file(first.final_dir / "adapter_model.safetensors")
    shutil.rmtree(first.final_dir)  # as if killed after checkpoint-2, before final/ and result.json
    (tmp_path / "r" / "result.json").unlink()
    again = train(config, tiny_model, snapshot.path, tmp_path / "r")
    assert again.resumed_from == tmp_path / "r" / "checkpoint-2"
    assert again.steps == 2 and again.loss_history == first.loss_history  # no extra step
    final = load_file(again.final_dir / "adapter_model.safetensors")
    assert final.keys() == trained.keys() and all(torch.equal(final[k], trained[k]) for k in final)
    assert not (again.final_dir / "optimizer.pt").exists() and (again.final_dir / "config.yaml").is_file()


def test_resume_unfinished_continues_a_stopped_run_and_starts_a_finished_one_over(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """train.resume: unfinished, as the DVC sft stage runs: DVC reruns a finished stage only because its
    inputs changed, so a finished run is started over even where `auto` would refuse the new settings."""
    steps = ["train.max_steps=2", "train.gradient_checkpointing=false"]
    unfinished = [*steps, "train.resume=unfinished"]
    run_dir = tmp_path / "r"
    first = train(load_config(None, unfinished), tiny_model, snapshot.path, run_dir)
    shutil.rmtree(first.final_dir)  # stopped after checkpoint-2, before final/ and result.json
    (run_dir / "result.json").unlink()
    continued = train(load_config(None, unfinished), tiny_model, snapshot.path, run_dir)
    assert continued.resumed_from == run_dir / "checkpoint-2" and continued.loss_history == first.loss_history

    with pytest.raises(ValueError, match="different setup"):
        train(load_config(None, [*steps, "train.lr=2e-3"]), tiny_model, snapshot.path, run_dir)  # auto
    restarted = train(load_config(None, [*unfinished, "train.lr=2e-3"]), tiny_model, snapshot.path, run_dir)
    assert restarted.resumed_from is None and restarted.steps == 2
    assert restarted.loss_history[0][1] == pytest.approx(first.loss_history[0][1])  # the same start...
    assert restarted.loss_history[1][1] != pytest.approx(first.loss_history[1][1])  # ...at the new lr
    assert load_config(run_dir / "config.yaml").train.lr == 2e-3

    # A stopped run whose settings changed since cannot be continued; the error says how to start over.
    shutil.rmtree(restarted.final_dir)
    (run_dir / "result.json").unlink()
    with pytest.raises(ValueError, match=r"(?s)train\.lr: 0\.002 -> 0\.0001.*or delete the folder"):
        train(load_config(None, unfinished), tiny_model, snapshot.path, run_dir)


def test_a_checkpoint_path_of_another_setup_is_refused(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """train.resume: PATH is compared with the checkpoint's own config.yaml and run.json, as a run folder is: a
    checkpoint of another run trained at another lr went on at its old lr (the scheduler state it holds), unsaid."""
    steps = ["train.max_steps=4", "train.save_steps=2", "train.gradient_checkpointing=false"]
    first = train(load_config(None, steps), tiny_model, snapshot.path, tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    with pytest.raises(
        ValueError, match=r"(?s)checkpoint-2 was trained with a different setup.*train\.lr: 0\.0001 -> "
    ):
        train(
            load_config(None, [*steps, "train.lr=3e-3", f"train.resume={checkpoint}"]),
            tiny_model,
            snapshot.path,
            tmp_path / "b",
        )
    assert not (tmp_path / "b" / "checkpoint-4").exists()
    same = train(load_config(None, [*steps, f"train.resume={checkpoint}"]), tiny_model, snapshot.path, tmp_path / "c")
    assert same.resumed_from == checkpoint and same.loss_history == first.loss_history[2:]


def test_resuming_an_earlier_checkpoint_deletes_what_came_after_it(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """train.resume: a checkpoint before the latest: the later checkpoints, final/ and result.json are the part of
    the run that is redone. Kept, checkpoint-4 was rewritten in place under its old completion marker (a kill
    mid-save left it looking complete), and `auto` resumed from it after a kill before step 4."""
    steps = ["train.max_steps=4", "train.save_steps=2", "train.gradient_checkpointing=false"]
    run_dir = tmp_path / "r"
    first = train(load_config(None, steps), tiny_model, snapshot.path, run_dir)
    again = load_config(None, [*steps, f"train.resume={run_dir / 'checkpoint-2'}"])
    setup_training(again, tiny_model, snapshot.path, run_dir)  # the run folder as the resumed training starts it
    assert checkpoints(run_dir) == [run_dir / "checkpoint-2"]
    assert not (run_dir / "checkpoint-4").exists() and not (run_dir / "final").exists()
    assert not (run_dir / "result.json").exists()
    redone = train(again, tiny_model, snapshot.path, run_dir)
    assert redone.resumed_from == run_dir / "checkpoint-2" and redone.loss_history == first.loss_history
    assert checkpoints(run_dir) == [run_dir / "checkpoint-2", run_dir / "checkpoint-4"]


def test_a_metrics_line_cut_short_does_not_stop_the_resume(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """A run stopped while it appended to metrics.jsonl (a kill, a full disk) leaves its last line cut short, always
    a step past its last complete checkpoint (a step logs before it saves). The resume drops that part as it drops
    every later line; it failed on parsing it (JSONDecodeError) at every try, so the run could not be resumed."""
    steps = ["train.max_steps=4", "train.save_steps=2", "train.gradient_checkpointing=false"]
    run_dir = tmp_path / "r"
    first = train(load_config(None, steps), tiny_model, snapshot.path, run_dir)
    # As the run stood when stopped in the middle of writing step 3's line: checkpoint-2 its latest.
    for later in (run_dir / "checkpoint-4", run_dir / "final"):
        shutil.rmtree(later)
    (run_dir / "result.json").unlink()
    metrics = run_dir / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= 2]
    metrics.write_text("".join(kept) + '{"step": 3, "loss": 1.2')

    resumed = train(load_config(None, steps), tiny_model, snapshot.path, run_dir)
    assert resumed.resumed_from == run_dir / "checkpoint-2"
    assert resumed.loss_history == first.loss_history and resumed.eval_history == first.eval_history
    assert metrics.read_text().endswith("\n")
