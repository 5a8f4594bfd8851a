"""Scoring a predictions file (written by `batch_infer`) against its reference answers."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmops.answers import exact_match

REQUIRED_FIELDS = ("index", "reference", "prediction")


@dataclass(frozen=True)
class RecordScore:
    """One record's outcome."""

    index: int
    source: str
    reference: str
    prediction: str
    correct: bool


@dataclass
class EvalResult:
    """Accuracy over a predictions file, with every record's outcome."""

    accuracy: float
    correct: int
    total: int
    per_record: list[RecordScore] = field(default_factory=list)
    metric: str = "exact_match"
    predictions: str = ""

    def summary(self) -> dict[str, Any]:
        """The numbers without the per-record list: for metrics.json and MLflow."""
        data = asdict(self)
        data.pop("per_record")
        return data


def evaluate_predictions(pred_file: str | os.PathLike[str]) -> EvalResult:
    """Exact-match accuracy of a `batch_infer` predictions file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON or lacks `index`, `reference` or `prediction`; an empty file.
    """
    path = Path(pred_file)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist (batch inference writes it)")
    scores: list[RecordScore] = []
    # Split at newlines only: str.splitlines also ends lines at U+2028, U+2029 and U+0085, which an answer holds as
    # it is (the file is written with ensure_ascii=False).
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); is the file truncated?") from None
        missing = [key for key in REQUIRED_FIELDS if key not in record]
        if missing:
            raise ValueError(
                f"{path}:{number}: missing {', '.join(missing)}; this is not a batch_infer predictions file"
            )
        prediction, reference = str(record["prediction"]), str(record["reference"])
        scores.append(
            RecordScore(
                int(record["index"]),
                str(record.get("source", "")),
                reference,
                prediction,
                exact_match(prediction, reference),
            )
        )
    if not scores:
        raise ValueError(f"{path} holds no predictions")
    seen: set[int] = set()
    for score in scores:
        if score.index in seen:
            raise ValueError(f"{path}: record index {score.index} appears twice; write predictions with batch_infer")
        seen.add(score.index)
    correct = sum(s.correct for s in scores)
    return EvalResult(correct / len(scores), correct, len(scores), scores, predictions=str(path))
