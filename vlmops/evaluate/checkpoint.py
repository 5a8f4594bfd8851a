"""Evaluate a trained run folder in-process: predict its saved eval split, then score with `evaluate_run`.

The run folder says everything: its saved config, its base model, and the dataset snapshot whose
`eval.jsonl` was held out. With `eval.evaluate_base` the base model answers the same split, so the report
shows what the fine-tuning gained: a LoRA run's adapter is switched off for it (or, where the fast engine merged it
into the weights, the base is loaded again). The files are `vlmops.evaluate.run`'s layout.
"""

from __future__ import annotations

import functools
import gc
import os
from pathlib import Path

import torch
from peft import PeftModel

from vlmops.config import PipelineConfig
from vlmops.evaluate.run import BASE_PREDICTIONS, PREDICTIONS, RunEvaluation, evaluate_run, remove_scores
from vlmops.infer.batch_job import BatchResult, predict_eval_file
from vlmops.infer.resolve import model_source, resolve_model_ref
from vlmops.models.loading import LoadedModel, load_model
from vlmops.train.rundir import open_run

EVAL_SPLIT = "eval.jsonl"


def evaluate_checkpoint(
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
    remove_scores(out)
    resolve = functools.partial(
        resolve_model_ref, tracking_uri=config.tracking.uri, dvc_remote_url=config.versioning.remote_url
    )
    source = model_source(str(run_dir), None, resolve)

    loaded = _load(config, source.checkpoint, source.adapter)
    tuned_batch = _predict(loaded, config, eval_file, out / PREDICTIONS)
    base_batch = None
    if config.eval.evaluate_base:
        if isinstance(loaded.model, PeftModel):
            with loaded.model.disable_adapter():  # the same weights without the adapter: no second load
                base_batch = _predict(loaded, config, eval_file, out / BASE_PREDICTIONS)
        else:
            # Full fine-tuning: the base is another model. LoRA on CUDA: the fast engine merged the adapter into the
            # weights (merge_adapter), and a merged adapter cannot be switched off. Either way: free the tuned model
            # first, then load the base (a LoRA run's is the checkpoint its adapter was loaded on).
            del loaded
            _free_memory()
            base = source.checkpoint if source.adapter is not None else resolve(run.info.base_model)
            loaded = _load(config, base, None)
            base_batch = _predict(loaded, config, eval_file, out / BASE_PREDICTIONS)
    return evaluate_run(out, eval_file, str(run_dir), tuned_batch, base_batch)


def _load(config: PipelineConfig, checkpoint: Path, adapter: Path | None) -> LoadedModel:
    return load_model(
        checkpoint,
        dtype=config.model.dtype,
        attn=config.model.attn,
        adapter=adapter,
        allow_pickle=config.model.allow_pickle,
        compile_cache=config.model.compile_cache,
    )


def _predict(loaded: LoadedModel, config: PipelineConfig, eval_file: Path, out_file: Path) -> BatchResult:
    return predict_eval_file(loaded, eval_file, out_file, config)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
