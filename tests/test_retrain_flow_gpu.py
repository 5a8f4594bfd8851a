"""The retrain flow on a GPU: every step's CUDA path, which the CPU suite cannot reach.

On CUDA the flow trains in bf16 with compiled layers, merges (written in bf16, proved in float32), answers the eval
split with the fast engine (base and fine-tuned) and registers the merged model. The CPU suite runs the same flow in
float32 with the plain engine; bugs in the CUDA paths (a merge checked in bf16, an adapter merged under the eval's
base step) were found by reading, not by a test: this one runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.timeout(1800)]


def test_retrain_flow_on_cuda(tmp_path: Path, prefect_harness: None) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.retrain import retrain

    overrides = [
        f"run.output_dir={tmp_path}/outputs",
        f"model.cache_dir={tmp_path}/outputs/cache",
        f"tracking.uri=sqlite:///{tmp_path}/outputs/mlflow.db",
    ]
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        summary = retrain(str(ROOT / "pipeline.yaml"), overrides)

    assert summary["finetuned_accuracy"] > summary["base_accuracy"]
    run_dir = Path(summary["summary_file"]).parent
    merged = json.loads((run_dir / "merged" / "config.json").read_text())
    assert (merged.get("dtype") or merged.get("torch_dtype")) == "bfloat16"  # model.dtype auto on CUDA
    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    steps = {r.info.run_name: r for r in children}
    assert all(r.info.status == "FINISHED" for r in children)
    merge = steps["merge"].data.metrics
    assert merge["parity_max_abs_diff"] <= merge["parity_atol"] == 1e-3
    assert client.get_model_version_by_alias("vlmops-demo", "challenger").version == summary["model_version"]
