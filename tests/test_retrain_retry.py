"""A retried retrain flow run goes on where it stopped: in the run folder its first try made, the steps that finished
reused, its eval jobs resumed from their finished shards. Nothing is trained twice and no eval record is answered twice.

One flow run, three tries: the first fails in the fine-tuned eval job (its child dies after one shard of three), the
second (the flow's own retry, in this process) after both eval jobs, in evaluate; the third is `prefect flow-run retry`
as a user runs it, in a process of its own. Before, each try made a new run folder, trained and merged again and
answered every eval record again there, leaving the last try's half-done job behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.prefect_runs import task_runs, task_states

ROOT = Path(__file__).resolve().parents[1]

MARK = "answered before the crash"


def _local_run(outputs: Path, *settings: str) -> list[str]:
    """Overrides for a run under `outputs` (its output, model cache and SQLite tracking store), plus `settings`."""
    return [
        f"run.output_dir={outputs}",
        f"model.cache_dir={outputs}/cache",
        f"tracking.uri=sqlite:///{outputs}/mlflow.db",
        *settings,
    ]


def _retrain_retried_once(tmp_path: Path, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """Run the retrain flow with one retry (its task results kept under `tmp_path`); it must complete: its state and
    summary."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    import flows.retrain

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        state = flows.retrain.retrain.with_options(retries=1)(str(ROOT / "pipeline.yaml"), overrides, return_state=True)
        assert state.is_completed(), state
        return state, state.result()


def _stamp(path: Path) -> tuple[int, int]:
    """Inode and mtime: a step that writes its file again (aside, then renamed) changes both."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _parent_run(tracking_uri: str, flow_run_id: Any) -> Any:
    """The one MLflow parent run of the flow run (every try's), failing the test if there are several."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    where = f"tags.prefect_flow_run_id = '{flow_run_id}' and tags.`mlflow.parentRunId` IS NULL"
    (parent,) = client.search_runs(experiments, where)
    return parent


def _step_runs(tracking_uri: str, parent_id: str, step: str) -> list[Any]:
    """The child runs of a step under the parent run, every try's, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    where = f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.run_name = '{step}'"
    return list(client.search_runs([experiment_id], where, order_by=["attributes.start_time ASC"]))


@pytest.mark.integration
def test_a_cached_result_is_reused_only_while_what_it_names_is_there(tmp_path: Path, prefect_harness: None) -> None:
    """`run_or_reuse`: a step cached for the flow run is reused while its folder is there; deleted, the step runs again
    and its new result replaces the cached one, which the next call reuses."""
    from prefect import flow, task
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.caching import run_or_reuse, within_flow_run
    from vlmops.train.merge import MergeResult

    ran: list[str] = []

    @task(cache_policy=within_flow_run([]), persist_result=True)
    def write_model(out_dir: str) -> MergeResult:
        Path(out_dir).mkdir()
        (Path(out_dir) / "model.safetensors").write_text(f"try {len(ran)}")
        ran.append(out_dir)
        return MergeResult(Path(out_dir), max_abs_diff=len(ran), atol=1.0, adapter=True)

    @flow
    def steps(out_dir: str) -> list[tuple[float, bool]]:
        reused = []
        for delete_before in (False, False, True, False):
            if delete_before:
                shutil.rmtree(out_dir)
            result, cached = run_or_reuse(write_model, out_dir)
            reused.append((result.max_abs_diff, cached))
        return reused

    model = tmp_path / "merged"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        assert steps(str(model)) == [(1, False), (1, True), (2, False), (2, True)]
    assert ran == [str(model)] * 2 and (model / "model.safetensors").read_text() == "try 1"


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_a_retried_flow_run_goes_on_in_its_run_folder_and_answers_no_eval_record_twice(
    tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    import flows.retrain
    import tasks.infer
    from vlmops.errors import RunFailed

    outputs = tmp_path / "outputs"
    runs = outputs / "runs"
    overrides = _local_run(
        outputs,
        *("data.demo.num_train=16", "data.demo.num_eval=6", "train.max_steps=2", "infer.shard_size=2"),
    )
    real_job = tasks.infer.run_job_in_child
    jobs: list[tuple[str, int, int]] = []  # each eval job run: its folder under runs/, parts before, parts after
    stamps: dict[str, tuple[int, int]] = {}  # files of the run folder the later tries must leave as they are

    def job_dying_after_its_first_shard(model: str, input_spec: str, output: str, config: Any, **kwargs: Any) -> None:
        job = Path(output)
        first_try = job.name == "predictions.jsonl.job" and not any(Path(j[0]).name == job.name for j in jobs)
        if first_try:  # the child answers one shard, then dies
            config = config.model_copy(update={"infer": config.infer.model_copy(update={"max_shards": 1})})
        before = len(list(job.glob("part-*.jsonl")))
        try:
            real_job(model, input_spec, output, config, **kwargs)
        finally:
            jobs.append((job.relative_to(runs).as_posix(), before, len(list(job.glob("part-*.jsonl")))))
        if first_try:
            # The shard done before the crash, marked: a retry that answers it again would answer it without the mark.
            part = job / "part-00000.jsonl"
            rows = [json.loads(line) for line in part.read_text().splitlines()]
            part.write_text("".join(json.dumps({**row, "response": MARK}) + "\n" for row in rows))
            run_dir = job.parents[1]
            for name in ("train/result.json", "merged/model.safetensors", "eval/base_predictions.jsonl"):
                stamps[name] = _stamp(run_dir / name)
            raise RunFailed("the GPU worker went away")

    def evaluate_failing(out_dir: str, *args: Any) -> None:
        stamps["eval/predictions.jsonl"] = _stamp(Path(out_dir) / "predictions.jsonl")
        raise RuntimeError("the evaluation's worker went away")

    monkeypatch.setattr(tasks.infer, "run_job_in_child", job_dying_after_its_first_shard)
    monkeypatch.setattr(flows.retrain, "evaluate", evaluate_failing)
    storage = tmp_path / "prefect-storage"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        state = flows.retrain.retrain.with_options(retries=1)(str(ROOT / "pipeline.yaml"), overrides, return_state=True)
        api = str(PREFECT_API_URL.value())
    assert state.is_failed(), state
    (run,) = (p.name for p in runs.iterdir())
    # Both tries in one run folder: the base job once, the fine-tuned one resumed with the two shards it lacked.
    assert jobs == [
        (f"{run}/eval/base_predictions.jsonl.job", 0, 3),
        (f"{run}/eval/predictions.jsonl.job", 0, 1),
        (f"{run}/eval/predictions.jsonl.job", 1, 3),
    ], jobs

    # The third try: `prefect flow-run retry` (no deployment: the flow's entrypoint, run here) with the same results
    # storage, in a process without the faults above.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api, "PREFECT_LOCAL_STORAGE_PATH": str(storage)}
    flow_run_id = state.state_details.flow_run_id
    command = [str(Path(sys.executable).with_name("prefect")), "flow-run", "retry", str(flow_run_id)]
    retried = subprocess.run(
        [*command, "--entrypoint", "flows/retrain.py:retrain"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert retried.returncode == 0, retried.stdout[-3000:] + retried.stderr[-3000:]

    assert [p.name for p in runs.iterdir()] == [run]
    run_dir = runs / run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_dir"] == str(run_dir)
    for name, stamp in stamps.items():  # not trained, merged or answered again
        assert _stamp(run_dir / name) == stamp, name
    # The three tries are one MLflow parent run, finished.
    parent = _parent_run(f"sqlite:///{outputs}/mlflow.db", flow_run_id)
    assert (parent.info.run_id, parent.info.status) == (summary["mlflow_run_id"], "FINISHED")
    states = task_states(flow_run_id)
    assert states["train"] == states["merge"] == ["Completed", "Cached", "Cached"], states
    assert sorted(states["batch_infer"]) == ["Cached", "Cached", "Cached", "Completed", "Completed", "Failed"], states
    # Every eval record once, in order; the shard answered before the crash as it was then.
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["source"].rsplit(":", 1)[1] for row in rows] == [str(i) for i in range(1, 7)]
    assert [row["prediction"] for row in rows].count(MARK) == 2 and rows[0]["prediction"] == rows[1][
        "prediction"
    ] == MARK
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == [
        "base_predictions.jsonl",
        "comparison.json",
        "comparison.png",
        "metrics.json",
        "predictions.jsonl",
    ]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_retry_after_register_keeps_the_version_its_earlier_try_registered(
    tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try fails right after register (auto_promote's promotion); the flow's retry takes that registration
    (`Cached`) and promotes the same version: one version, the summary names it. Before, the retry registered
    version 2 of the same trained model (each try logs to new MLflow runs, the key of the registration's reuse).

    Both tries log to one MLflow parent run, which ends FINISHED with the evaluation's metrics, and which the version's
    `mlflow_run_id` tag names. Before, each try opened a parent run of its own: the first try's stayed FAILED beside
    the retry's, and the version (registered by the first try) named that failed one."""
    from mlflow.tracking import MlflowClient

    import flows.retrain
    from flows.retrain import MERGE_TAG

    outputs = tmp_path / "outputs"
    overrides = _local_run(
        outputs,
        "registry.auto_promote=true",
        *("versioning.enabled=false", "eval.evaluate_base=false"),
        *("data.demo.num_train=8", "data.demo.num_eval=2", "train.max_steps=2"),
    )
    challengers: list[str] = []

    def promotion_failing_once(config_path: str, overrides: list[str] | None, challenger: str) -> dict[str, str]:
        challengers.append(challenger)
        if len(challengers) == 1:
            raise RuntimeError("the promotion's worker went away")
        return {"decision": "promoted"}  # the gate itself is tests/test_retrain_promote.py's

    monkeypatch.setattr(flows.retrain, "promote", promotion_failing_once)
    state, summary = _retrain_retried_once(tmp_path, overrides)
    assert challengers == ["1", "1"]
    assert (summary["model_version"], summary["alias_version"], summary["promotion"]) == ("1", "1", "promoted")
    assert json.loads(Path(summary["summary_file"]).read_text())["model_version"] == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
    (version,) = client.search_model_versions("name = 'vlmops-demo'")
    assert str(version.version) == "1" and version.tags["run_folder"] == Path(summary["run_dir"]).name
    assert client.get_registered_model("vlmops-demo").aliases == {"challenger": 1}
    states = task_states(state.state_details.flow_run_id)
    assert (states["register"], states["merge"]) == (["Completed", "Cached"], ["Completed", "Cached"]), states
    # The version names the merge its model came from: the first try's, which the retry reused.
    assert version.tags[MERGE_TAG] == task_runs(state.state_details.flow_run_id)["merge"][0][1]

    parent = _parent_run(f"sqlite:///{outputs}/mlflow.db", state.state_details.flow_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_id == summary["mlflow_run_id"]
    assert parent.data.metrics["finetuned_accuracy"] == summary["finetuned_accuracy"]
    assert version.tags["mlflow_run_id"] == parent.info.run_id
    # Each try's register step has its child run under it; the retry's, which reused the registration, says so.
    registers = _step_runs(f"sqlite:///{outputs}/mlflow.db", parent.info.run_id, "register")
    assert [(run.info.status, run.data.tags["cached"]) for run in registers] == [
        ("FINISHED", "False"),
        ("FINISHED", "True"),
    ]
    assert version.run_id == registers[0].info.run_id  # the version was registered from the first try's step


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_retry_after_register_that_merged_again_registers_the_new_model_as_a_new_version(
    tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try registers version 1, then fails in the promotion, with the run folder's merged/ deleted; the
    flow's retry merges again (train reused), evaluates the new model and registers it as version 2, whose merge tag
    names the new merge task run, and which the alias and the promotion take; version 1 stays, naming the first merge.
    Before, the retry reused version 1 (`Cached`), whose weights were the deleted model's, not the one it evaluated."""
    from mlflow.tracking import MlflowClient

    import flows.retrain
    from flows.retrain import MERGE_TAG
    from vlmops.infer.resolve import RETRAIN_MODEL_DIR

    outputs = tmp_path / "outputs"
    overrides = _local_run(
        outputs,
        "registry.auto_promote=true",
        *("versioning.enabled=false", "eval.evaluate_base=false"),
        *("data.demo.num_train=8", "data.demo.num_eval=2", "train.max_steps=2"),
    )
    challengers: list[str] = []

    def promotion_failing_after_a_clean_up(
        config_path: str, overrides: list[str] | None, challenger: str
    ) -> dict[str, str]:
        challengers.append(challenger)
        if len(challengers) == 1:
            (run_dir,) = (outputs / "runs").iterdir()
            shutil.rmtree(run_dir / RETRAIN_MODEL_DIR)
            raise RuntimeError("the promotion's worker went away")
        return {"decision": "promoted"}

    monkeypatch.setattr(flows.retrain, "promote", promotion_failing_after_a_clean_up)
    state, summary = _retrain_retried_once(tmp_path, overrides)
    assert challengers == ["1", "2"]
    assert (summary["model_version"], summary["alias_version"], summary["promotion"]) == ("2", "2", "promoted")
    assert (Path(summary["run_dir"]) / RETRAIN_MODEL_DIR).is_dir()

    states = task_states(state.state_details.flow_run_id)
    assert states["train"] == ["Completed", "Cached"], states
    assert states["merge"] == ["Completed", "Cached", "Completed"], states
    assert states["register"] == ["Completed", "Completed"], states
    first_merge, _, new_merge = (run_id for _, run_id in task_runs(state.state_details.flow_run_id)["merge"])
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
    versions = {str(v.version): v for v in client.search_model_versions("name = 'vlmops-demo'")}
    assert sorted(versions) == ["1", "2"]
    assert (versions["1"].tags[MERGE_TAG], versions["2"].tags[MERGE_TAG]) == (first_merge, new_merge)
    for version in versions.values():  # one flow run, one run folder, one MLflow parent run
        assert version.tags["run_folder"] == Path(summary["run_dir"]).name
        assert version.tags["mlflow_run_id"] == summary["mlflow_run_id"]
    assert client.get_registered_model("vlmops-demo").aliases == {"challenger": 2}
    # The retry's merge step (its MLflow child run) is the task run the new version names.
    merges = _step_runs(client.tracking_uri, summary["mlflow_run_id"], "merge")
    assert [run.data.tags["prefect_task_run_id"] for run in merges] == [first_merge, new_merge]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_retry_runs_again_a_finished_step_whose_output_was_deleted(
    tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try fails in evaluate, after the run folder's merged model and base predictions were deleted (a
    clean-up, a disk swapped); the flow's retry finds merge and the base eval job `Cached`, sees that what their results
    name is gone, and runs them again (and the fine-tuned eval job, whose model changed), not train. Before, the retry
    took the cached results and failed on the missing merged/ folder. One MLflow parent run, FINISHED."""
    from mlflow.tracking import MlflowClient

    import flows.retrain

    outputs = tmp_path / "outputs"
    overrides = _local_run(
        outputs,
        *("versioning.enabled=false", "eval.evaluate_base=true"),
        *("data.demo.num_train=8", "data.demo.num_eval=2", "train.max_steps=2"),
    )
    real_evaluate = flows.retrain.evaluate
    deleted: list[Path] = []

    def evaluate_after_a_clean_up(out_dir: str, eval_file: str, model: str, *args: Any) -> Any:
        if not deleted:
            deleted.extend([Path(model), Path(out_dir) / "base_predictions.jsonl"])
            shutil.rmtree(deleted[0])
            deleted[1].unlink()
            raise RuntimeError("the evaluation's worker went away")
        return real_evaluate(out_dir, eval_file, model, *args)

    monkeypatch.setattr(flows.retrain, "evaluate", evaluate_after_a_clean_up)
    state, summary = _retrain_retried_once(tmp_path, overrides)
    run_dir = Path(summary["run_dir"])
    assert deleted == [run_dir / "merged", run_dir / "eval" / "base_predictions.jsonl"]
    assert all(path.exists() for path in deleted)
    states = task_states(state.state_details.flow_run_id)
    assert states["train"] == ["Completed", "Cached"], states
    assert states["merge"] == ["Completed", "Cached", "Completed"], states
    # The base job: Completed, then Cached and run again; the fine-tuned job: Completed twice (its model changed).
    assert sorted(states["batch_infer"]) == ["Cached", "Completed", "Completed", "Completed", "Completed"], states

    parent = _parent_run(f"sqlite:///{outputs}/mlflow.db", state.state_details.flow_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_id == summary["mlflow_run_id"]
    assert parent.data.metrics["finetuned_accuracy"] == summary["finetuned_accuracy"]
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
    (version,) = client.search_model_versions("name = 'vlmops-demo'")
    assert version.tags["mlflow_run_id"] == parent.info.run_id
    # The retry's child runs under the one parent: train reused (tagged), merge run again.
    cached = {
        step: [run.data.tags["cached"] for run in _step_runs(client.tracking_uri, parent.info.run_id, step)]
        for step in ("train", "merge")
    }
    assert cached == {"train": ["False", "True"], "merge": ["False", "False"]}
