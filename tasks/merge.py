"""merge: fold the LoRA adapter into a plain transformers checkpoint, then prove the logits match (in a child
process, as training, so the worker frees the GPU after)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.caching import within_flow_run
from tasks.gpu import gpu_slot
from vlmops.tracking import Tracker
from vlmops.train.merge import MergeResult, launch_merge


@task(name="merge", cache_policy=within_flow_run(["run_dir"]), persist_result=True)  # a retry of the flow run reuses it
def merge(run_dir: str, out_dir: str, atol: float | None, dtype: str) -> MergeResult:
    """Merge and run the parity check; a failed check raises and stops the flow."""
    with gpu_slot():
        return launch_merge(Path(run_dir), Path(out_dir), atol=atol, dtype=dtype)


def log_merge(tracker: Tracker, run_id: str, result: MergeResult, cached: bool) -> None:
    tracker.log_metrics(run_id, {"parity_max_abs_diff": result.max_abs_diff, "parity_atol": result.atol})
    tracker.set_tags(run_id, {"cached": cached, "merged_path": result.path, "adapter": result.adapter})
