"""Exact-match scoring, accuracy over a predictions file, and the base vs fine-tuned report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmops.answers import exact_match, normalize_answer
from vlmops.evaluate.metrics import EvalResult, evaluate_predictions
from vlmops.evaluate.report import compare, plot_comparison, write_comparison


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("red", "red", True),
        ("Red", "red", True),  # case
        ("  red \n", "red", True),  # surrounding whitespace
        ("red.", "red", True),  # trailing punctuation
        ("Red!?", "red", True),
        ("red .", "Red", True),
        ("红色。", "红色", True),  # CJK punctuation
        ("red  circle", "Red circle", True),  # whitespace runs inside count as one space
        ("red circle", "red", False),  # extra words are wrong
        ("a red", "red", False),
        (".red", "red", False),  # only trailing punctuation is ignored
        ("re d", "red", False),
        ("", "red", False),
        ("blue", "red", False),
        ("", "", True),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: bool) -> None:
    assert exact_match(prediction, reference) is expected


def test_normalize_answer() -> None:
    assert normalize_answer("  The Circle.  ") == "the circle"
    assert normalize_answer("Straße") == normalize_answer("STRASSE")  # casefold, not lower


def write_predictions(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with path.open("w") as f:
        for index, (prediction, reference) in enumerate(pairs):
            f.write(
                json.dumps(
                    {
                        "index": index,
                        "source": f"eval.jsonl:{index + 1}",
                        "prompt": "q",
                        "reference": reference,
                        "prediction": prediction,
                        "num_images": 1,
                    }
                )
                + "\n"
            )
    return path


def test_accuracy_over_a_predictions_file(tmp_path: Path) -> None:
    pred = write_predictions(
        tmp_path / "p.jsonl",
        [("Red.", "red"), ("blue", "green"), ("yellow", "Yellow"), ("a purple", "purple")],
    )
    result = evaluate_predictions(pred)
    assert (result.correct, result.total, result.accuracy) == (2, 4, 0.5)
    assert [s.correct for s in result.per_record] == [True, False, True, False]
    assert result.per_record[1].source == "eval.jsonl:2"
    assert result.summary() == {
        "accuracy": 0.5,
        "correct": 2,
        "total": 4,
        "metric": "exact_match",
        "predictions": str(pred),
    }


def test_line_separators_inside_an_answer_stay_inside_its_record(tmp_path: Path) -> None:
    """The predictions file is written with ensure_ascii=False: U+2028, U+2029 and U+0085 stay raw in its strings."""
    pred = tmp_path / "p.jsonl"
    rows = [("red\u2028car", "red\u2028car"), ("a\u0085b\u2029", "ab")]
    pred.write_text(
        "".join(
            json.dumps({"index": i, "reference": r, "prediction": p}, ensure_ascii=False) + "\n"
            for i, (p, r) in enumerate(rows)
        ),
        encoding="utf-8",
    )
    result = evaluate_predictions(pred)
    assert (result.correct, result.total) == (1, 2)


def test_bad_predictions_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_predictions(tmp_path / "none.jsonl")
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text('{"index": 0, "reference": "red", "prediction": "red"}\n{"index": 1, "refer')
    with pytest.raises(ValueError, match=r"truncated\.jsonl:2: not valid JSON"):
        evaluate_predictions(truncated)
    other = tmp_path / "other.jsonl"
    other.write_text('{"index": 0, "answer": "red"}\n')
    with pytest.raises(ValueError, match=r"other\.jsonl:1: missing reference, prediction"):
        evaluate_predictions(other)
    twice = write_predictions(tmp_path / "twice.jsonl", [("red", "red")])
    twice.write_text(twice.read_text() * 2)
    with pytest.raises(ValueError, match="index 0 appears twice"):
        evaluate_predictions(twice)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no predictions"):
        evaluate_predictions(empty)


def results(tmp_path: Path) -> tuple[EvalResult, EvalResult]:
    refs = ["red", "blue", "green", "yellow", "purple"]
    base = write_predictions(tmp_path / "base.jsonl", list(zip(["red", "x", "x", "yellow", "x"], refs)))
    tuned = write_predictions(tmp_path / "tuned.jsonl", list(zip(["red", "blue", "green", "x", "x"], refs)))
    return evaluate_predictions(base), evaluate_predictions(tuned)


def test_compare_counts_fixed_and_broken_records(tmp_path: Path) -> None:
    base, tuned = results(tmp_path)
    report = compare(base, tuned)
    assert report["base_accuracy"] == pytest.approx(0.4)
    assert report["finetuned_accuracy"] == pytest.approx(0.6)
    assert report["gain"] == pytest.approx(0.2)
    assert (report["fixed"], report["broken"], report["both_correct"], report["both_wrong"]) == (2, 1, 1, 1)
    fewer = write_predictions(tmp_path / "fewer.jsonl", [("red", "red")])
    with pytest.raises(ValueError, match="not over the same records"):
        compare(base, evaluate_predictions(fewer))


def test_comparison_plot_is_a_png(tmp_path: Path) -> None:
    base, tuned = results(tmp_path)
    png = plot_comparison(base, tuned, tmp_path / "plots" / "accuracy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    numbers, chart = write_comparison(base, tuned, tmp_path / "report")
    assert json.loads(numbers.read_text())["fixed"] == 2
    assert chart.name == "comparison.png" and chart.stat().st_size > 1000
