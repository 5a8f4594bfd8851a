"""One evaluation layout for a trained run, written the same way by the retrain flow and `vlmops eval`.

    OUT/predictions.jsonl       the fine-tuned model's answers (batch_infer format)
    OUT/base_predictions.jsonl  the base model's answers (when the base is evaluated)
    OUT/metrics.json            accuracy, counts, speed; and the comparison
    OUT/comparison.json, .png   base vs fine-tuned (when the base is evaluated)

Who writes the predictions differs (the flow's batch_infer step, or `evaluate_checkpoint` in-process);
scoring them and writing the files is this one function.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmops.evaluate.metrics import EvalResult, evaluate_predictions
from vlmops.evaluate.report import compare, write_comparison

if TYPE_CHECKING:  # scoring needs no model code; the flow's evaluate step stays light
    from vlmops.infer.batch_job import BatchResult

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
"""The evaluation folder's name inside a run folder (the flow's run, or `vlmops eval --ckpt RUN`'s default)."""
PREDICTIONS = "predictions.jsonl"
BASE_PREDICTIONS = "base_predictions.jsonl"
METRICS = "metrics.json"
COMPARISON_FILES = ("comparison.json", "comparison.png")


@dataclass
class RunEvaluation:
    """The outcome of evaluating one run: results, their batch statistics, and where the files went."""

    out_dir: Path
    eval_file: Path
    tuned: EvalResult
    tuned_batch: BatchResult | None = None
    base: EvalResult | None = None
    base_batch: BatchResult | None = None
    comparison: dict[str, float] | None = None

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / METRICS

    def metrics(self) -> dict[str, float]:
        """The numbers for MLflow: the comparison with a base, else the fine-tuned accuracy alone."""
        if self.comparison is not None:
            return dict(self.comparison)
        return {"finetuned_accuracy": self.tuned.accuracy, "total": self.tuned.total}


def evaluate_run(
    out_dir: str | os.PathLike[str],
    eval_file: str | os.PathLike[str],
    run: str,
    tuned_batch: BatchResult | None = None,
    base_batch: BatchResult | None = None,
) -> RunEvaluation:
    """Score `OUT/predictions.jsonl` (and `OUT/base_predictions.jsonl` when there) and write metrics.json
    and, with a base, comparison.json and comparison.png.

    Args:
        out_dir: the evaluation folder that holds the predictions.
        eval_file: the eval split the predictions answer (recorded in metrics.json).
        run: what was evaluated (a run folder, a model path), recorded in metrics.json.
        tuned_batch, base_batch: the batch statistics of the predictions, recorded when given.

    Raises:
        FileNotFoundError: no `OUT/predictions.jsonl`.
        ValueError: a predictions file that is not batch_infer's, or base and fine-tuned over other records.
    """
    out = Path(out_dir)
    result = RunEvaluation(out, Path(eval_file), evaluate_predictions(out / PREDICTIONS), tuned_batch)
    if (out / BASE_PREDICTIONS).is_file():
        result.base = evaluate_predictions(out / BASE_PREDICTIONS)
        result.base_batch = base_batch
        result.comparison = compare(result.base, result.tuned)
        write_comparison(result.base, result.tuned, out)
    else:
        for name in COMPARISON_FILES:  # an earlier evaluation's, with a base: not these predictions' numbers
            (out / name).unlink(missing_ok=True)
    result.metrics_file.write_text(json.dumps(_metrics_json(result, run), indent=2) + "\n")
    log.info(
        "evaluated %s: accuracy %.4f (%d/%d)", run, result.tuned.accuracy, result.tuned.correct, result.tuned.total
    )
    return result


def remove_scores(out_dir: str | os.PathLike[str]) -> None:
    """Delete what an earlier evaluation wrote in `out_dir` besides its predictions (the base's predictions, metrics,
    comparison), before a new one writes its own: one that stops part way then leaves no other predictions' numbers
    beside its own."""
    for name in (BASE_PREDICTIONS, METRICS, *COMPARISON_FILES):
        (Path(out_dir) / name).unlink(missing_ok=True)


def _metrics_json(result: RunEvaluation, run: str) -> dict[str, Any]:
    def batch(b: BatchResult | None) -> dict[str, Any] | None:
        return None if b is None else {**asdict(b), "path": str(b.path)}

    return {
        "run": run,
        "eval_file": str(result.eval_file),
        "finetuned": result.tuned.summary(),
        "finetuned_batch": batch(result.tuned_batch),
        "base": result.base.summary() if result.base is not None else None,
        "base_batch": batch(result.base_batch),
        "comparison": result.comparison,
    }
