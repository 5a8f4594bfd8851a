"""`vlmops eval --ckpt RUN_DIR` through the entry point: the run's saved config and eval split, the adapter
applied, base compared, in `vlmops.evaluate.run`'s layout."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vlmops.cli.main import main
from vlmops.config import load_config
from vlmops.data.formats import read_dataset
from vlmops.evaluate.metrics import evaluate_predictions
from vlmops.infer.batch_job import predict_eval_file
from vlmops.models.loading import load_model
from vlmops.scratch import new_held_folder, remove_held
from vlmops.train.rundir import RunInfo, run_config

ROOT = Path(__file__).resolve().parents[2]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_command(ckpt: str, overrides: list[str], out: str | None) -> int:
    """`vlmops eval --ckpt CKPT [--set ...] [--out OUT]`"""
    sets = [arg for override in overrides for arg in ("--set", override)]
    return main(["eval", "--ckpt", ckpt, *sets, *(["--out", out] if out is not None else [])])


def test_eval_command_scores_the_runs_eval_split_against_the_base(
    lora_run: Path, snapshot: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert eval_command(str(lora_run), ["infer.max_new_tokens=6"], str(out)) == 0
    printed = capsys.readouterr().out

    eval_split = snapshot / "eval.jsonl"
    tuned = read_lines(out / "predictions.jsonl")
    base = read_lines(out / "base_predictions.jsonl")
    assert [r["source"] for r in tuned] == [c.source for c in read_dataset(eval_split).conversations]
    assert all(r["generated_tokens"] <= 6 for r in tuned)  # the override applies on top of the run's config

    # The base predictions are the plain base model's, so the adapter was really switched off for them...
    plain = predict_eval_file(
        load_model(tiny_model),
        eval_split,
        tmp_path / "plain.jsonl",
        run_config(str(lora_run), None, ["infer.max_new_tokens=6"]),
    )
    assert [r["prediction"] for r in base] == [r["prediction"] for r in read_lines(plain.path)]
    # ... and on for the fine-tuned ones.
    assert [r["prediction"] for r in tuned] != [r["prediction"] for r in base]

    metrics = json.loads((out / "metrics.json").read_text())
    rescored = evaluate_predictions(out / "predictions.jsonl")
    assert metrics["finetuned"]["accuracy"] == rescored.accuracy
    assert metrics["finetuned"]["total"] == len(tuned) == 6
    assert metrics["eval_file"] == str(eval_split)
    assert metrics["comparison"]["total"] == 6
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert f"fine-tuned: accuracy {rescored.accuracy:.1%} ({rescored.correct}/6)" in printed
    assert "base:" in printed and "gain:" in printed


def test_eval_command_defaults_to_the_run_folder_and_skips_base_when_asked(
    lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    assert eval_command(str(run), ["eval.evaluate_base=false", "infer.max_new_tokens=2"], None) == 0
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["metrics.json", "predictions.jsonl"]
    assert json.loads((run / "eval" / "metrics.json").read_text())["base"] is None
    assert "base:" not in capsys.readouterr().out


def test_eval_command_names_a_missing_eval_split(
    lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    dataclasses.replace(RunInfo.read(run, run), dataset=str(tmp_path / "gone")).write(run)
    assert eval_command(str(run), [], None) == 2
    err = capsys.readouterr().err
    assert "gone/eval.jsonl does not exist" in err and "dvc pull" in err
    assert eval_command(str(tmp_path / "not-a-run"), [], None) == 2
    assert "not a vlmops run or checkpoint folder" in capsys.readouterr().err


def test_eval_command_on_a_full_fine_tuning_run_loads_the_base_separately(
    full_run: Path, tiny_model: Path, snapshot: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    assert eval_command(str(full_run), [], str(out)) == 0
    eval_split = snapshot / "eval.jsonl"
    config = run_config(str(full_run), None, [])
    for folder, name in ((full_run / "final", "predictions.jsonl"), (tiny_model, "base_predictions.jsonl")):
        plain = predict_eval_file(load_model(folder), eval_split, tmp_path / f"plain-{name}", config)
        assert [r["prediction"] for r in read_lines(out / name)] == [r["prediction"] for r in read_lines(plain.path)]


@pytest.mark.gpu
def test_eval_command_on_cuda_answers_a_lora_runs_base_without_its_adapter(
    lora_run: Path, tiny_model: Path, snapshot: Path, tmp_path: Path
) -> None:
    """On CUDA the fast engine merges the adapter into the weights for the tuned predictions, so it can no longer be
    switched off: the base predictions come from the base loaded again, not from the merged (tuned) weights."""
    out = tmp_path / "eval"
    overrides = ["infer.max_new_tokens=6", "infer.fast_min_records=0"]  # the fast engine for the tiny split
    assert eval_command(str(lora_run), overrides, str(out)) == 0
    config = run_config(str(lora_run), None, ["infer.max_new_tokens=6"])
    tuned = [r["prediction"] for r in read_lines(out / "predictions.jsonl")]
    base = [r["prediction"] for r in read_lines(out / "base_predictions.jsonl")]
    plain = predict_eval_file(load_model(tiny_model), snapshot / "eval.jsonl", tmp_path / "plain.jsonl", config)
    assert base == [r["prediction"] for r in read_lines(plain.path)]
    assert tuned != base


def test_an_evaluation_that_fails_leaves_no_earlier_scores_beside_its_predictions(
    full_run: Path, tmp_path: Path
) -> None:
    """The base model gone, the second evaluation fails after writing the fine-tuned predictions: the first one's
    metrics.json and comparison (other predictions' numbers) stood beside them, looking like this evaluation's."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    out = tmp_path / "eval"
    assert eval_command(str(run), ["infer.max_new_tokens=2"], str(out)) == 0
    assert {"metrics.json", "comparison.json", "comparison.png", "base_predictions.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    dataclasses.replace(RunInfo.read(run, run), base_model=str(tmp_path / "gone")).write(run)
    assert eval_command(str(run), ["infer.max_new_tokens=3"], str(out)) == 2
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl"]


# A job killed outright (SIGKILL, the OOM killer) while it answered an eval split into OUT: its scratch folder stays.
KILLED_EVAL_JOB = """
import os, signal, sys
from pathlib import Path
from vlmops.scratch import new_held_folder
path, _ = new_held_folder(Path(sys.argv[1]), sys.argv[2])
(path / "part-00000.jsonl").write_text("{}\\n")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_eval_job_removes_the_scratch_of_eval_jobs_killed_outright_beside_its_output_never_a_live_ones(
    tiny_model: Path, snapshot: Path, tmp_path: Path
) -> None:
    """An eval split's job runs in a scratch folder beside its predictions file: one killed outright left it there
    forever (a TemporaryDirectory's clean-up never ran). The next one there removes it, not one a live job holds
    (here this process's own), and leaves none of its own."""
    out = tmp_path / "plain.jsonl"
    stem = f".{out.name}."
    killed = [sys.executable, "-c", KILLED_EVAL_JOB, str(tmp_path), stem]
    assert subprocess.run(killed, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == -signal.SIGKILL
    (dead,) = tmp_path.glob(f"{stem}*")
    live, held = new_held_folder(tmp_path, stem)  # not `held_folder`, which would sweep the dead one itself
    try:
        config = load_config(None, ["infer.max_new_tokens=2"])
        predict_eval_file(load_model(tiny_model), snapshot / "eval.jsonl", out, config)
        assert sorted(tmp_path.iterdir()) == sorted([out, live])
    finally:
        remove_held(live, held)
    assert not dead.exists()
