"""`evaluate_run`: the one evaluation layout the flow and `vlmops eval` both write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmops.evaluate.run import BASE_PREDICTIONS, PREDICTIONS, evaluate_run


def write_predictions(path: Path, answers: list[tuple[str, str]]) -> None:
    path.write_text(
        "".join(
            json.dumps({"index": i, "source": f"eval.jsonl:{i + 1}", "reference": ref, "prediction": pred}) + "\n"
            for i, (ref, pred) in enumerate(answers)
        )
    )


def test_with_a_base_writes_metrics_and_comparison(tmp_path: Path) -> None:
    write_predictions(tmp_path / PREDICTIONS, [("red", "Red."), ("blue", "blue"), ("green", "red")])
    write_predictions(tmp_path / BASE_PREDICTIONS, [("red", "x"), ("blue", "blue"), ("green", "green")])
    result = evaluate_run(tmp_path, tmp_path / "eval.jsonl", "runs/r1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        BASE_PREDICTIONS,
        "comparison.json",
        "comparison.png",
        "metrics.json",
        PREDICTIONS,
    ]
    metrics = json.loads(result.metrics_file.read_text())
    assert metrics["run"] == "runs/r1" and metrics["eval_file"] == str(tmp_path / "eval.jsonl")
    assert metrics["finetuned"]["correct"] == 2 and metrics["base"]["correct"] == 2
    assert metrics["comparison"] == json.loads((tmp_path / "comparison.json").read_text())
    assert result.metrics() == metrics["comparison"]
    assert result.metrics()["fixed"] == 1 and result.metrics()["broken"] == 1


def test_without_a_base_writes_metrics_only(tmp_path: Path) -> None:
    write_predictions(tmp_path / PREDICTIONS, [("red", "red"), ("blue", "red")])
    result = evaluate_run(tmp_path, tmp_path / "eval.jsonl", "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", PREDICTIONS]
    assert result.metrics() == {"finetuned_accuracy": 0.5, "total": 2}
    assert json.loads(result.metrics_file.read_text())["base"] is None


def test_no_predictions_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{PREDICTIONS} does not exist"):
        evaluate_run(tmp_path, tmp_path / "eval.jsonl", "m")


def test_without_a_base_an_earlier_comparison_goes(tmp_path: Path) -> None:
    """Evaluated again without the base (`vlmops eval --set eval.evaluate_base=false` on the same folder), the earlier
    evaluation's comparison.json and .png went on standing beside the new metrics, their numbers from other
    predictions."""
    write_predictions(tmp_path / PREDICTIONS, [("red", "red"), ("blue", "red")])
    write_predictions(tmp_path / BASE_PREDICTIONS, [("red", "x"), ("blue", "blue")])
    evaluate_run(tmp_path, tmp_path / "eval.jsonl", "m")
    (tmp_path / BASE_PREDICTIONS).unlink()
    evaluate_run(tmp_path, tmp_path / "eval.jsonl", "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", PREDICTIONS]
