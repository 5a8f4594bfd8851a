"""MLflow helpers against a real SQLite store in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vlmops.config import TrackingConfig
from vlmops.errors import UserInputError
from vlmops.tracking import Tracker, resolve_tracking_uri


def test_parent_child_runs_params_metrics_and_registration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="t"), artifact_root=tmp_path / "artifacts")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with tracker.run("parent", tags={"git_commit": "abc"}) as parent:
        tracker.log_params(parent, {"train.lr": 0.1, "long": "x" * 7000, "none": None})
        with tracker.run("train", parent) as child:
            for step, loss in [(1, 2.0), (2, 1.5), (3, float("nan")), (4, 1.0)]:
                tracker.log_metrics(child, {"loss": loss}, step=step)  # a NaN is a tag (below)
            # An accuracy with nothing scored, a norm gone infinite: MLflow keeps finite metrics only, so each is a
            # `metric.<name>` tag and a warning naming it; None is "not measured" (no eval split) and skipped.
            tracker.log_metrics(child, {"finetuned_accuracy": float("nan"), "samples": 4, "best_eval_loss": None})
            tracker.log_series(child, {"grad_norm": [2.0, float("inf"), 1.0, float("-inf")]})
        version = tracker.register_model(child, model, "m", "challenger", tags={"dvc.model.md5": "123"})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    p = client.get_run(parent)
    assert p.data.params["train.lr"] == "0.1"
    assert len(p.data.params["long"]) == 6000
    assert p.info.status == "FINISHED"
    c = client.get_run(child)
    assert c.data.tags["mlflow.parentRunId"] == parent
    assert [(m.step, m.value) for m in client.get_metric_history(child, "loss")] == [(1, 2.0), (2, 1.5), (4, 1.0)]
    assert [m.value for m in client.get_metric_history(child, "grad_norm")] == [2.0, 1.0]
    assert c.data.metrics["samples"] == 4.0 and "finetuned_accuracy" not in c.data.metrics
    assert {k: v for k, v in c.data.tags.items() if k.startswith("metric.")} == {
        "metric.loss": "nan at step 3",
        "metric.finetuned_accuracy": "nan",
        "metric.grad_norm": "inf at step 1; -inf at step 3",
    }
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        m.startswith("metric finetuned_accuracy of MLflow run")
        and m.endswith("is nan: recorded as the tag metric.finetuned_accuracy")
        for m in warned
    )
    assert any(m.startswith("metric grad_norm") and "is inf at step 1; -inf at step 3" in m for m in warned)
    mv = client.get_model_version_by_alias("m", "challenger")
    assert str(mv.version) == version.version == "1"
    assert mv.tags["dvc.model.md5"] == "123"
    assert (tmp_path / "artifacts").is_dir()
    assert [a.path for a in client.list_artifacts(child, "model")] == ["model/config.json"]


def test_failed_block_marks_run_failed(tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db", experiment="t"))
    with pytest.raises(RuntimeError), tracker.run("boom") as run_id:
        raise RuntimeError("x")
    assert tracker.client.get_run(run_id).info.status == "FAILED"


def test_a_finished_run_is_found_by_its_tags_whatever_quotes_they_hold(tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db", experiment="e"))
    for output in ["/data/it's here", "s3://b/a\\b", 'say "x"']:
        with tracker.run("job", tags={"job_id": "j1", "output": output}) as run_id:
            pass
        assert tracker.finished_run({"job_id": "j1", "output": output}) == run_id
    assert tracker.finished_run({"job_id": "j2", "output": "/data/it's here"}) is None
    with pytest.raises(RuntimeError), tracker.run("job", tags={"job_id": "j3"}):
        raise RuntimeError("crashed")
    assert tracker.finished_run({"job_id": "j3"}) is None  # a failed run is not the job's record
    assert tracker.finished_run({"output": 'it\'s "both"'}) is None  # no filter can hold it: none found


def test_relative_sqlite_uri_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///out/m.db") == f"sqlite:///{tmp_path}/out/m.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_registering_again_from_the_same_run_reuses_the_version(tmp_path: Path) -> None:
    """A retried `register` step (the version was made, then the connection broke) makes no second version."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="t"), artifact_root=tmp_path / "artifacts")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with tracker.run("register") as first_run:
        first = tracker.register_model(first_run, model, "m", "challenger")
        again = tracker.register_model(first_run, model, "m", "challenger")
    with tracker.run("register") as second_run:
        other = tracker.register_model(second_run, model, "m", "challenger")
    assert (first.version, again.version, other.version) == ("1", "1", "2")
    assert [a.path for a in tracker.client.list_artifacts(first_run, "model")] == ["model/config.json"]
    assert len(tracker.client.search_model_versions("name = 'm'")) == 2


def test_a_model_folder_is_logged_through_its_linked_subfolder_and_refused_with_a_broken_link(tmp_path: Path) -> None:
    """MLflow's log_artifacts walks without entering a symlinked subfolder (every artifact store's), and the upload
    check listed the folder the same way: the version was registered without those files. A broken link is named
    before anything is logged or registered."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="t"), artifact_root=tmp_path / "artifacts")
    (tmp_path / "shared" / "deep").mkdir(parents=True)
    (tmp_path / "shared" / "preprocessor_config.json").write_text("{}")
    (tmp_path / "shared" / "deep" / "extra.json").write_text("[]")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "processor").symlink_to(tmp_path / "shared")
    with tracker.run("register") as run_id:
        tracker.register_model(run_id, model, "m", "challenger")
    (model / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    broken = f"{model}/tokenizer.json is a broken symlink to {tmp_path}/gone.json"
    with tracker.run("register") as second, pytest.raises(UserInputError, match=broken):
        tracker.register_model(second, model, "m", "challenger")
    stored, pending = [], ["model"]
    while pending:
        for info in tracker.client.list_artifacts(run_id, pending.pop()):
            (pending if info.is_dir else stored).append(info.path)
    assert sorted(stored) == [
        "model/config.json",
        "model/processor/deep/extra.json",
        "model/processor/preprocessor_config.json",
    ]
    assert tracker.client.list_artifacts(second) == []
    assert [str(v.version) for v in tracker.client.search_model_versions("name = 'm'")] == ["1"]


def test_a_registration_once_per_flow_run_finishes_the_version_an_earlier_try_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`once_per`: a try of the flow run died after creating its version, before the alias; the retry (new MLflow
    runs, the same run folder) gives that version the alias instead of making a second one. Another flow run, or a
    retry in another run folder (a machine without the first one's, which trained a model of its own), registers its
    own."""
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t"), tmp_path / "artifacts")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    once_per = ("prefect_flow_run_id", "run_folder")
    flow_run = {"prefect_flow_run_id": "flow-1", "run_folder": "20261205-120000-ab12"}

    def worker_gone(*args: object) -> None:
        raise ConnectionError("the worker went away")

    with monkeypatch.context() as broken, tracker.run("first try") as first_try:
        broken.setattr(tracker.client, "set_registered_model_alias", worker_gone)
        with pytest.raises(ConnectionError):
            tracker.register_model(first_try, model, "m", "challenger", tags=flow_run, once_per=once_per)
    assert tracker.client.get_registered_model("m").aliases == {}
    with tracker.run("retry") as retry, tracker.run("another flow run") as other_run:
        again = tracker.register_model(retry, model, "m", "challenger", tags=flow_run, once_per=once_per)
        elsewhere = {**flow_run, "run_folder": "20261205-120500-cd34"}
        moved = tracker.register_model(retry, model, "m", "challenger", tags=elsewhere, once_per=once_per)
        other_flow = {**flow_run, "prefect_flow_run_id": "flow-2"}
        other = tracker.register_model(other_run, model, "m", "challenger", tags=other_flow, once_per=once_per)
        with pytest.raises(ValueError, match="tags must give 'run_folder' a value"):
            tracker.register_model(
                retry, model, "m", "challenger", tags={"prefect_flow_run_id": "flow-1"}, once_per=once_per
            )
    assert (again.version, again.alias_version, moved.version, other.version) == ("1", "1", "2", "3")
    assert len(tracker.client.search_model_versions("name = 'm'")) == 3
    assert tracker.client.get_registered_model("m").aliases == {"challenger": 3}


def test_a_registration_once_per_merge_is_new_for_a_new_merge_and_never_takes_a_version_without_the_tag(
    tmp_path: Path,
) -> None:
    """`once_per` with the retrain flow's merge tag: a retry that reuses the merge reuses its version, one that merged
    again registers a version of its own; a version of the same flow run and folder made before the tag existed (an
    older flow run retried after an upgrade) is not taken for either."""
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t"), tmp_path / "artifacts")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    flow_run = {"prefect_flow_run_id": "flow-1", "run_folder": "20261205-120000-ab12"}
    once_per = ("prefect_flow_run_id", "run_folder", "prefect_merge_task_run_id")

    def register(run_id: str, merge: str) -> str:
        tags = {**flow_run, "prefect_merge_task_run_id": merge}
        return tracker.register_model(run_id, model, "m", "challenger", tags=tags, once_per=once_per).version

    with tracker.run("before the upgrade") as old_try, tracker.run("retry") as retry:
        old = tracker.register_model(old_try, model, "m", "challenger", tags=flow_run, once_per=tuple(flow_run))
        versions = [old.version, register(retry, "merge-1"), register(retry, "merge-1"), register(retry, "merge-2")]
    assert versions == ["1", "2", "2", "3"]
    assert tracker.client.get_registered_model("m").aliases == {"challenger": 3}


def test_a_password_in_a_model_version_tag_is_stored_masked_as_in_a_run_tag(tmp_path: Path) -> None:
    """A tag value holding a URL with its password (a remote registered from an older vlmops, a source a user named)
    is stored masked on the model version, as on runs: in the tags a version is registered with and in those set on it
    later (a promotion's). A registration once per such a value finds its earlier version by the masked value."""
    secret = "s3cret-tag-pw"
    url = f"https://vlmops:{secret}@host/dvc"
    masked = "https://vlmops:***@host/dvc"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="t"), tmp_path / "artifacts")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with tracker.run("register", tags={"source": url}) as first, tracker.run("retry") as retry:
        tracker.set_tags(first, {"dvc.remote": url})
        version = tracker.register_model(
            first, model, "m", "challenger", tags={"dvc.remote": url}, once_per=["dvc.remote"]
        )
        again = tracker.register_model(
            retry, model, "m", "challenger", tags={"dvc.remote": url}, once_per=["dvc.remote"]
        )
        tracker.set_version_tags("m", version.version, {"promotion.against": f"{url} (champion)"})

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_model_version("m", version.version).tags
    assert (tags["dvc.remote"], tags["promotion.against"]) == (masked, f"{masked} (champion)")
    run_tags = client.get_run(first).data.tags
    assert (run_tags["source"], run_tags["dvc.remote"]) == (masked, masked)
    assert again.version == version.version
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()] == []


def test_a_run_once_per_flow_run_goes_on_in_the_one_an_earlier_try_left(tmp_path: Path) -> None:
    """`once_per`: the retry of a flow run reopens the parent run its failed try left (FAILED), its steps' child runs
    join it, and it ends FINISHED; another flow run, or the same one in another run folder, gets a run of its own."""
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t"), tmp_path / "artifacts")
    once_per = ("prefect_flow_run_id", "run_folder")
    flow_run = {"prefect_flow_run_id": "flow-1", "run_folder": "20261205-120000-ab12", "git_commit": "abc"}

    with pytest.raises(RuntimeError), tracker.run("retrain", tags=flow_run, once_per=once_per) as first_try:
        with tracker.run("train", first_try):
            pass
        raise RuntimeError("the worker went away")
    assert tracker.client.get_run(first_try).info.status == "FAILED"
    with tracker.run("retrain", tags={**flow_run, "git_commit": "def"}, once_per=once_per) as retry:
        assert tracker.client.get_run(retry).info.status == "RUNNING"
        with tracker.run("evaluate", retry):
            pass
    with tracker.run("retrain", tags={**flow_run, "prefect_flow_run_id": "flow-2"}, once_per=once_per) as other:
        pass
    with tracker.run("retrain", tags={**flow_run, "run_folder": "20261205-120500-cd34"}, once_per=once_per) as moved:
        pass
    unnamed_folder = {"prefect_flow_run_id": "flow-1"}
    with (
        pytest.raises(ValueError, match="tags must give 'run_folder' a value"),
        tracker.run("x", None, unnamed_folder, once_per),
    ):
        pass

    assert retry == first_try and len({first_try, other, moved}) == 3
    parent = tracker.client.get_run(retry)
    assert (parent.info.status, parent.data.tags["git_commit"]) == ("FINISHED", "def")
    children = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{retry}'")
    assert sorted(run.info.run_name for run in children) == ["evaluate", "train"]
    tops = tracker.client.search_runs([tracker.experiment_id], "tags.`mlflow.parentRunId` IS NULL")
    assert sorted(run.info.run_id for run in tops) == sorted([first_try, other, moved])


def test_an_older_version_registered_again_leaves_the_alias_on_the_newest(tmp_path: Path) -> None:
    """Two runs registering at once may set the alias in either order; the newest version keeps it. Here the
    older run's step finishes last (its retry, after the newer run registered)."""
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t"), tmp_path / "artifacts")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with tracker.run("older") as older, tracker.run("newer") as newer:
        first = tracker.register_model(older, model, "m", "challenger")
        second = tracker.register_model(newer, model, "m", "challenger")
        again = tracker.register_model(older, model, "m", "challenger")
        other = tracker.register_model(older, model, "m2", "candidate")
    assert (first.alias_version, second.alias_version) == ("1", "2")
    assert (again.version, again.alias_version) == ("1", "2")
    assert tracker.client.get_registered_model("m").aliases == {"challenger": 2}
    assert (other.version, other.alias_version) == ("1", "1")  # another model's versions do not count


def _open_store(uri: str, experiment: str) -> None:
    Tracker(TrackingConfig(uri=uri, experiment=experiment))


def test_processes_creating_one_store_at_once(tmp_path: Path) -> None:
    """MLflow creates a new SQLite store's tables without a lock; several processes opening it at once (two
    `vlmops run` started together) must all get the store and one experiment."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_open_store, args=(uri, "shared")) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    client = MlflowClient(tracking_uri=uri)
    assert [e.name for e in client.search_experiments()] == ["shared", "Default"]
