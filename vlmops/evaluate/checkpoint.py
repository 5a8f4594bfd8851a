"""`vlmops eval --ckpt RUN_DIR`: score a trained run on the eval split it was trained beside.

The run folder says everything: its saved config, its base model, and the dataset snapshot whose
`eval.jsonl` was held out. With `eval.evaluate_base` the base model answers the same split, so the report
shows what the fine-tuning gained.

    OUT/predictions.jsonl       the fine-tuned model's answers (batch_infer format)
    OUT/base_predictions.jsonl  the base model's answers (eval.evaluate_base)
    OUT/metrics.json            accuracy, counts, speed; and the comparison
    OUT/comparison.json, .png   base vs fine-tuned (eval.evaluate_base)
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlmops.config import PipelineConfig
from vlmops.evaluate.metrics import EvalResult, evaluate_predictions
from vlmops.evaluate.report import compare, write_comparison
from vlmops.infer.batch_job import BatchResult, predict_eval_file
from vlmops.infer.resolve import model_source, resolve_model_ref, run_config
from vlmops.models.loading import LoadedModel, load_model
from vlmops.train.rundir import open_run

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
EVAL_SPLIT = "eval.jsonl"


@dataclass
class RunEvaluation:
    """The outcome of evaluating one run: results, their batch statistics, and where the files went."""

    out_dir: Path
    eval_file: Path
    tuned: EvalResult
    tuned_batch: BatchResult
    base: EvalResult | None = None
    base_batch: BatchResult | None = None
    comparison: dict[str, float] | None = None

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / "metrics.json"


def evaluate_run(
    run_dir: str | os.PathLike[str], config: PipelineConfig, out_dir: str | os.PathLike[str]
) -> RunEvaluation:
    """Predict the run's saved eval split with the trained model (and the base model), score, write files.

    Raises:
        FileNotFoundError: the run folder, its base model or its dataset snapshot is missing.
    """
    run = open_run(run_dir)
    eval_file = Path(run.info.dataset) / EVAL_SPLIT
    if not eval_file.is_file():
        raise FileNotFoundError(
            f"the run's eval split {eval_file} does not exist (run.json records the dataset snapshot "
            f"{run.info.dataset}); restore it (dvc pull) or run from the folder training ran in"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolve = functools.partial(resolve_model_ref, tracking_uri=config.tracking.uri)
    source = model_source(str(run_dir), None, resolve)

    loaded = _load(config, source.checkpoint, source.adapter)
    tuned_batch = _predict(loaded, config, eval_file, out / "predictions.jsonl")
    result = RunEvaluation(out, eval_file, evaluate_predictions(tuned_batch.path), tuned_batch)
    if config.eval.evaluate_base:
        if source.adapter is not None:
            with loaded.model.disable_adapter():  # the same weights without the adapter: no second load
                result.base_batch = _predict(loaded, config, eval_file, out / "base_predictions.jsonl")
        else:
            del loaded  # full fine-tuning: the base is another model; free the tuned one first
            _free_memory()
            loaded = _load(config, resolve(run.info.base_model), None)
            result.base_batch = _predict(loaded, config, eval_file, out / "base_predictions.jsonl")
        result.base = evaluate_predictions(result.base_batch.path)
        result.comparison = compare(result.base, result.tuned)
        write_comparison(result.base, result.tuned, out)
    result.metrics_file.write_text(json.dumps(_metrics(result, run_dir), indent=2) + "\n")
    log.info(
        "evaluated %s: accuracy %.4f (%d/%d)",
        run_dir,
        result.tuned.accuracy,
        result.tuned.correct,
        result.tuned.total,
    )
    return result


def eval_command(ckpt: str, config_path: str | None, overrides: list[str], out: str | None) -> int:
    """`vlmops eval --ckpt RUN_DIR [--config FILE] [--set k=v] [--out DIR]`; returns the exit status."""
    try:
        config = run_config(ckpt, config_path, overrides)
        result = evaluate_run(ckpt, config, out if out is not None else Path(ckpt) / EVAL_DIR)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tuned = result.tuned
    print(f"eval split: {result.eval_file} ({tuned.total} records, metric {tuned.metric})")
    print(
        f"fine-tuned: accuracy {tuned.accuracy:.1%} ({tuned.correct}/{tuned.total})  "
        f"[{result.tuned_batch.tokens_per_s:.1f} tokens/s]"
    )
    if result.base is not None and result.comparison is not None:
        c = result.comparison
        print(f"base:       accuracy {result.base.accuracy:.1%} ({result.base.correct}/{result.base.total})")
        print(f"gain:       {c['gain'] * 100:+.1f} points (fixed {c['fixed']}, broke {c['broken']})")
    print(
        f"wrote {result.out_dir}/ (predictions.jsonl, metrics.json"
        + (", comparison.png)" if result.base is not None else ")")
    )
    return 0


def _load(config: PipelineConfig, checkpoint: Path, adapter: Path | None) -> LoadedModel:
    return load_model(checkpoint, dtype=config.model.dtype, attn=config.model.attn, adapter=adapter)


def _predict(loaded: LoadedModel, config: PipelineConfig, eval_file: Path, out_file: Path) -> BatchResult:
    return predict_eval_file(loaded, eval_file, out_file, config)


def _metrics(result: RunEvaluation, run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    def batch(b: BatchResult) -> dict[str, Any]:
        return {**asdict(b), "path": str(b.path)}

    return {
        "run": str(run_dir),
        "eval_file": str(result.eval_file),
        "finetuned": result.tuned.summary(),
        "finetuned_batch": batch(result.tuned_batch),
        "base": result.base.summary() if result.base is not None else None,
        "base_batch": batch(result.base_batch) if result.base_batch is not None else None,
        "comparison": result.comparison,
    }


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
