"""Eval samples side by side: each record's image and prompt, its reference, and what each model answered.

The rows feed a table a person reads (a Prefect table artifact): the first `limit` records of the eval split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmops.data.formats import read_dataset
from vlmops.evaluate.metrics import EvalResult

SAMPLE_ROWS = 50
"""Rows in a samples table: enough to see the kind of mistakes, small enough for a UI page."""


def sample_rows(
    eval_file: str | os.PathLike[str],
    results: dict[str, EvalResult],
    limit: int = SAMPLE_ROWS,
    allowed_roots: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """One row per record (first `limit`): `image`, `prompt`, `reference`, then `<label>` (the answer) and
    `<label> correct` for each labelled result (e.g. {"challenger": ..., "champion": ...}).

    Records are matched by their position in `eval_file` (the line or list index the predictions' `source`
    ends with), so every result must come from predicting that file. `allowed_roots` (`data.allowed_roots`): the
    folders besides the file's own that its images may lie in, as for the batch job that answered it.

    Raises:
        ValueError: a prediction's source is not a record of `eval_file`.
    """
    roots = [Path(root) for root in allowed_roots]
    dataset = read_dataset(eval_file, roots)
    prompts = {_position(c.source): c for c in dataset.conversations}
    problems = {_position(p.location): p for p in dataset.problems}
    scores = {label: {_position(s.source): s for s in result.per_record} for label, result in results.items()}
    first = next(iter(results.values()))
    rows: list[dict[str, Any]] = []
    for record in sorted(first.per_record, key=lambda s: s.index)[:limit]:
        position = _position(record.source)
        conversation = prompts.get(position)
        if position in problems:
            raise ValueError(f"{problems[position]} (the record of the prediction of {record.source})")
        if conversation is None:
            raise ValueError(f"prediction of {record.source} is not a record of {eval_file}: predict that file")
        user = [m for m in conversation.messages if m.role == "user"][-1]
        row: dict[str, Any] = {
            "image": ", ".join(Path(img.uri).name for img in conversation.images),
            "prompt": user.text("").strip(),
            "reference": record.reference,
        }
        for label, by_position in scores.items():
            score = by_position[position]
            row[label] = score.prediction
            row[f"{label} correct"] = score.correct
        rows.append(row)
    return rows


def _position(location: str) -> str:
    """`3` of `path/eval.jsonl:3`, `[3]` of `path/eval.json[3]`: where a record is within its file."""
    if location.endswith("]"):
        return location[location.rindex("[") :]
    return location.rsplit(":", 1)[-1]
