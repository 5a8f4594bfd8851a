"""merge: fold the LoRA adapter into a plain transformers checkpoint, then prove the logits match (in a child
process, as training, so the worker frees the GPU after)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.runtime import task_run

from tasks.caching import within_flow_run
from tasks.gpu import gpu_slot
from vlmops.tracking import Tracker
from vlmops.train.merge import MergeResult, launch_merge


@task(name="merge", cache_policy=within_flow_run(["run_dir"]), persist_result=True)  # a retry of the flow run reuses it
def merge(run_dir: str, out_dir: str, atol: float | None, dtype: str) -> MergeResult:
    """Merge and run the parity check; a failed check raises and stops the flow. The result names this task run, which
    a retry that reuses it keeps and a merge run again replaces: the model's identity to the registration."""
    with gpu_slot():
        result = launch_merge(Path(run_dir), Path(out_dir), atol=atol, dtype=dtype)
    return replace(result, task_run_id=task_run.id or "")


def log_merge(tracker: Tracker, run_id: str, result: MergeResult, cached: bool) -> None:
    tracker.log_metrics(run_id, {"parity_max_abs_diff": result.max_abs_diff, "parity_atol": result.atol})
    tracker.set_tags(
        run_id,
        {
            "cached": cached,
            "merged_path": result.path,
            "adapter": result.adapter,
            "prefect_task_run_id": result.task_run_id,
        },
    )
