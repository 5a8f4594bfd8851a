"""train: LoRA or full SFT in a subprocess (torchrun for several GPUs), so the worker frees the GPU after."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from tasks.caching import within_flow_run
from tasks.gpu import gpu_slot
from vlmops.plots import loss_curve
from vlmops.tracking import Tracker
from vlmops.train.launch import launch_training
from vlmops.train.sft import TrainResult


# Reused by a retry of the flow run only. The dataset snapshot's folder is named by its content hash; the base model's
# folder can be fetched again in place (`vlmops download --refresh`), so its files are in the key.
@task(
    name="train",
    cache_policy=within_flow_run(["config_file", "base_model"], ignore=["mlflow_run_id"]),
    persist_result=True,
)
def train_model(
    config_file: str, base_model: str, dataset: str, run_dir: str, tracking_uri: str, mlflow_run_id: str
) -> TrainResult:
    """Fine-tune the base model on the dataset snapshot; the loss streams live to the MLflow run."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": mlflow_run_id}
    with gpu_slot():
        return launch_training(Path(config_file), Path(base_model), Path(dataset), Path(run_dir), env=env)


def log_training(tracker: Tracker, run_id: str, result: TrainResult, cached: bool) -> None:
    tracker.log_params(run_id, {"trainable_params": result.trainable_params, "total_params": result.total_params})
    tracker.log_metrics(
        run_id,
        {
            "final_train_loss": result.train_loss,
            "best_eval_loss": result.eval_loss,
            "steps": result.steps,
            "samples_per_s": result.samples_per_s,
            "tokens_per_s": result.tokens_per_s,
        },
    )
    tracker.set_tags(run_id, {"cached": cached, "run_dir": result.run_dir, "final_dir": result.final_dir})
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(run_id, loss_curve(result.loss_history, result.eval_history, Path(tmp) / "loss_curve.png"))
