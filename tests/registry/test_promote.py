"""The promote flow on a real MLflow SQLite registry, a real DVC remote and Prefect's test harness: the first
version is promoted, a better challenger replaces the champion, one short of the margin does not, and the
champion then loads by `models:/NAME@champion` in `ChatModel`, `vlmops infer` and `vlmops batch-infer`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.prefect_artifacts import flow_run_artifacts
from tests.prefect_runs import task_states
from tests.registry.conftest import NAME, QUESTION, Registry

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[None]:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield


@pytest.fixture(scope="module")
def contests(registry: Registry, prefect: None) -> dict[str, dict[str, Any]]:
    """Four promote runs in a row, each after registering its challenger."""
    from flows.promote import promote

    config = str(registry.config_file)
    results = {}
    assert registry.register("b").version == "1"
    results["first"] = promote(config)  # no champion yet
    assert registry.register("a").version == "2"
    results["better"] = promote(config)  # A answers every reference; B does not
    assert registry.register("a").version == "3"
    results["short_of_margin"] = promote(config, ["registry.promotion.min_margin=0.5"])  # a tie, 0.5 required
    results["settled"] = promote(config, None, challenger="2")
    return results


def client(registry: Registry) -> MlflowClient:
    uri = registry.config.tracking.uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_first_version_is_promoted_without_a_champion(contests: dict[str, dict[str, Any]]) -> None:
    first = contests["first"]
    assert first["decision"] == "promoted" and first["champion"] is None and first["champion_score"] is None
    assert first["reason"] == "No champion yet: version 1 becomes the first."
    assert first["total"] == 4


def test_a_better_challenger_replaces_the_champion(registry: Registry, contests: dict[str, dict[str, Any]]) -> None:
    better = contests["better"]
    assert better["decision"] == "promoted" and (better["challenger"], better["champion"]) == ("2", "1")
    assert better["challenger_score"] == 1.0 > better["champion_score"]
    assert better["counts"]["broken"] == 0 and better["counts"]["fixed"] >= 1
    # both answered the same evaluation set: the challenger's snapshot, restored from the DVC remote
    work = Path(better["work_dir"])
    assert better["eval_file"] == str(work / "dataset" / "eval.jsonl")
    for role, version in (("challenger", 2), ("champion", 1)):
        lines = (work / f"{role}-v{version}_predictions.jsonl").read_text().splitlines()
        assert [json.loads(line)["reference"] for line in lines] == registry.references


def test_a_challenger_short_of_the_margin_is_rejected(registry: Registry, contests: dict[str, dict[str, Any]]) -> None:
    short = contests["short_of_margin"]
    assert short["decision"] == "rejected" and short["min_margin"] == 0.5
    assert short["challenger_score"] == short["champion_score"] == 1.0
    assert "does not beat champion version 2" in short["reason"]
    assert contests["settled"] == {"decision": "unchanged", "model_name": NAME, "champion": "2"}
    assert str(client(registry).get_model_version_by_alias(NAME, "champion").version) == "2"


def test_decisions_are_mlflow_runs_and_version_tags(registry: Registry, contests: dict[str, dict[str, Any]]) -> None:
    mlflow = client(registry)
    runs = {c["challenger"]: mlflow.get_run(c["mlflow_run_id"]) for c in list(contests.values())[:3]}
    assert {v: r.data.tags["promotion"] for v, r in runs.items()} == {"1": "promoted", "2": "promoted", "3": "rejected"}
    better = runs["2"]
    assert better.data.params["champion"] == "1" and better.data.params["min_margin"] == "0.0"
    assert better.data.metrics["challenger_accuracy"] == 1.0 and better.data.metrics["promoted"] == 1.0
    assert better.data.metrics["margin"] == pytest.approx(1.0 - contests["better"]["champion_score"])
    assert better.data.tags["prefect_flow_run_id"]
    artifacts = {a.path for a in mlflow.list_artifacts(better.info.run_id, "promotion")}
    assert artifacts == {
        f"promotion/{n}" for n in ("decision.json", "metrics_table.json", "samples.json", "promotion.md")
    }
    table = json.loads(Path(mlflow.download_artifacts(better.info.run_id, "promotion/metrics_table.json")).read_text())
    assert [(row["role"], row["version"]) for row in table] == [("challenger", "2"), ("champion", "1")]

    tags = {v: mlflow.get_model_version(NAME, v).tags for v in ("1", "2", "3")}
    assert tags["1"]["promotion.decision"] == "replaced" and tags["1"]["promotion.against"] == "2"
    assert tags["2"]["promotion.decision"] == "kept" and tags["2"]["promotion.against"] == "3"  # its last contest
    assert tags["3"]["promotion.decision"] == "rejected" and tags["3"]["promotion.accuracy"] == "1.0000"
    assert tags["3"]["promotion.run_id"] == contests["short_of_margin"]["mlflow_run_id"]


def test_each_promote_run_has_its_decision_and_samples_as_prefect_artifacts(
    registry: Registry, contests: dict[str, dict[str, Any]]
) -> None:
    run = client(registry).get_run(contests["better"]["mlflow_run_id"])
    artifacts = flow_run_artifacts(run.data.tags["prefect_flow_run_id"])
    assert set(artifacts) == {"promote-decision", "promote-eval-samples"}
    decision = artifacts["promote-decision"]
    assert decision.type == "markdown"
    assert "**promoted**" in decision.data and f"/runs/{run.info.run_id}" in decision.data
    assert f"/#/models/{NAME}/versions/2" in decision.data
    table = artifacts["promote-eval-samples"]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert [r["reference"] for r in rows] == registry.references
    assert all(r["challenger correct"] for r in rows) and rows[0]["image"] == "red.png"
    assert rows[0]["prompt"] == QUESTION and set(rows[0]) == {
        "image",
        "prompt",
        "reference",
        "challenger",
        "challenger correct",
        "champion",
        "champion correct",
    }


def test_the_champion_loads_in_chat_model(
    registry: Registry, contests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    from vlmops.infer.chat import ChatModel

    query = f"<img>{registry.snapshot_copy / 'images' / 'red.png'}</img>{QUESTION}"
    expected = ChatModel.from_config(str(registry.model_a), registry.config).chat(query)[0]
    champion = ChatModel.load(f"models:/{NAME}@champion", tracking_uri=registry.config.tracking.uri, cache_dir=tmp_path)
    assert "v2" in champion.loaded.path.parts
    from_config = ChatModel.from_config(f"models:/{NAME}@champion", registry.config)
    assert from_config.loaded.path.is_relative_to(Path(registry.config.model.cache_dir) / "registry")
    assert "v2" in from_config.loaded.path.parts
    assert from_config.chat(query)[0] == expected


def test_the_champion_loads_in_vlmops_infer(registry: Registry, contests: dict[str, dict[str, Any]]) -> None:
    from vlmops.infer.chat import ChatModel

    query = f"<img>{registry.snapshot_copy / 'images' / 'blue.png'}</img>{QUESTION}"
    expected = ChatModel.from_config(str(registry.model_a), registry.config).chat(query)[0]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmops.cli",
            "infer",
            "--model",
            f"models:/{NAME}@champion",
            "--config",
            str(registry.config_file),
        ],
        input=f"{query}\nquit\n",
        capture_output=True,
        text=True,
        cwd=registry.root,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
        check=True,
    )
    assert "/v2/" in done.stdout.splitlines()[0]  # model: <the downloaded version 2> on cpu
    assert expected in done.stdout


def test_the_champion_loads_in_vlmops_batch_infer(
    registry: Registry, contests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    from vlmops.cli.main import main
    from vlmops.infer.job_output import iter_results
    from vlmops.infer.output import open_output

    out = tmp_path / "answers"
    args = ["batch-infer", "--model", f"models:/{NAME}@champion", "--input", str(registry.snapshot_copy / "eval.jsonl")]
    assert main([*args, "--output", str(out), "--config", str(registry.config_file)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["uri"] == f"models:/{NAME}@champion" and manifest["model"]["version"] == "2"
    results = sorted(iter_results(open_output(str(out))), key=lambda r: r["source"])
    assert [r["response"] for r in results] == registry.references  # the champion is model A


def test_vlmops_promote_runs_the_flow(
    registry: Registry, contests: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmops.cli.main import main

    assert main(["promote", "--config", str(registry.config_file), "--challenger", f"models:/{NAME}/2"]) == 0
    assert f"{NAME} version 2 is the champion already: nothing to do" in capsys.readouterr().out
    assert main(["promote", "--config", str(registry.config_file), "--challenger", "9"]) == 2
    assert f"models:/{NAME}/9: not found in the registry" in capsys.readouterr().err


def test_a_retried_promotion_goes_on_where_it_stopped(
    registry: Registry, contests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promote flow run whose first try fails in the champion's eval job, after the challenger's job finished and
    one shard of two of the champion's: the flow's retry goes on in the same work folder, takes the challenger's
    predictions (`Cached`, its job not run again), answers only the champion's missing shard, and decides as the
    uninterrupted contest of the same two models did (`better`: A as version 2 against the champion B, version 1).
    Before, each try made a work folder of its own and answered every eval record again, for both versions.

    Another registered model of the same registry, so that the contests above are left as they are."""
    import tasks.infer
    from flows.promote import promote
    from flows.run_folder import FLOW_RUN_FILE
    from vlmops.errors import RunFailed

    name = "vlmops-retry"
    registry.register("b", name)
    client(registry).set_registered_model_alias(name, "champion", "1")
    assert registry.register("a", name).version == "2"

    def stamp(path: Path) -> tuple[int, int]:
        """Inode and mtime: a file written again (aside, then renamed) changes both."""
        return path.stat().st_ino, path.stat().st_mtime_ns

    real_job = tasks.infer.run_job_in_child
    jobs: list[tuple[str, int, int]] = []  # each eval job run: its folder's name, parts before, parts after
    stamps: dict[str, list[tuple[int, int]]] = {}  # the files the retry must leave as they are, after each job run

    def champion_job_dying_after_its_first_shard(
        model: str, input_spec: str, output: str, config: Any, **kwargs: Any
    ) -> None:
        job = Path(output)
        first_try = job.name.startswith("champion") and not any(j[0] == job.name for j in jobs)
        if first_try:  # the child answers one shard, then dies
            config = config.model_copy(update={"infer": config.infer.model_copy(update={"max_shards": 1})})
        before = len(list(job.glob("part-*.jsonl")))
        try:
            real_job(model, input_spec, output, config, **kwargs)
        finally:
            jobs.append((job.name, before, len(list(job.glob("part-*.jsonl")))))
        if job.name.startswith("champion"):
            (challenger,) = job.parent.glob("challenger*_predictions.jsonl")
            stamps.setdefault("part-00000", []).append(stamp(job / "part-00000.jsonl"))
            stamps.setdefault("challenger", []).append(stamp(challenger))
        if first_try:
            raise RunFailed("the GPU worker went away")

    monkeypatch.setattr(tasks.infer, "run_job_in_child", champion_job_dying_after_its_first_shard)
    overrides = [f"registry.model_name={name}", "infer.shard_size=2"]  # the eval set's 4 records in 2 shards
    state = promote.with_options(retries=1)(str(registry.config_file), overrides, return_state=True)
    assert state.is_completed(), state
    retried = state.result()

    assert jobs == [
        ("challenger-v2_predictions.jsonl.job", 0, 2),
        ("champion-v1_predictions.jsonl.job", 0, 1),
        ("champion-v1_predictions.jsonl.job", 1, 2),
    ], jobs
    assert stamps["part-00000"][0] == stamps["part-00000"][1]  # the shard answered before the crash, not again
    assert stamps["challenger"][0] == stamps["challenger"][1]
    work = Path(retried["work_dir"])
    assert stamp(work / "challenger-v2_predictions.jsonl") == stamps["challenger"][0]
    flow_run_id = str(state.state_details.flow_run_id)
    assert (work / FLOW_RUN_FILE).read_text().strip() == flow_run_id
    promotions = Path(registry.config.run.output_dir) / "promotions"
    assert [p for p in promotions.iterdir() if p.name.startswith(f"{name}-")] == [work]  # both tries in one folder
    states = task_states(flow_run_id)
    assert sorted(states["batch_infer"]) == ["Cached", "Completed", "Completed", "Failed"], states
    assert states["find_contest"] == ["Completed", "Completed"], states  # the registry read again by the retry
    for role, version in (("challenger", 2), ("champion", 1)):
        lines = (work / f"{role}-v{version}_predictions.jsonl").read_text().splitlines()
        assert [json.loads(line)["reference"] for line in lines] == registry.references

    uninterrupted = contests["better"]
    same = ("decision", "challenger", "champion", "challenger_score", "champion_score", "counts", "total", "reason")
    assert {key: retried[key] for key in same} == {key: uninterrupted[key] for key in same}
    assert str(client(registry).get_model_version_by_alias(name, "champion").version) == "2"


def test_a_champion_moved_by_another_promotion_is_not_replaced_unchecked(tmp_path: Path) -> None:
    """Two promotions at once (two retrain runs with auto_promote) each compare their challenger with the champion
    they found; the one that moves the alias second must not replace a champion it was never compared with."""
    from vlmops.config import load_config
    from vlmops.errors import RunFailed
    from vlmops.evaluate.metrics import EvalResult, RecordScore
    from vlmops.registry.promote import decide, find_contest, record_decision
    from vlmops.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = load_config(None, [f"tracking.uri={uri}", "registry.model_name=race"])
    tracker = Tracker(config.tracking, artifact_root=tmp_path / "artifacts")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for _ in range(3):
        with tracker.run("register") as run_id:
            tracker.register_model(run_id, model, "race", "challenger")
    tracker.client.set_registered_model_alias("race", "champion", "1")
    contest = find_contest(config, "3")  # version 3 against champion 1
    tracker.client.set_registered_model_alias("race", "champion", "2")  # the other promotion finishes first

    def result(right: int) -> EvalResult:
        scores = [
            RecordScore(i, f"e.jsonl:{i + 1}", "red", "red" if i < right else "blue", i < right) for i in range(4)
        ]
        return EvalResult(right / 4, right, 4, scores)

    decision = decide(contest, result(3), result(1), config, Path("e.jsonl"))
    assert decision.promoted and decision.champion == "1"
    with pytest.raises(RunFailed, match=r"@champion of race moved to version 2 while version 3 was compared"):
        record_decision(tracker, decision, contest)
    assert str(tracker.client.get_model_version_by_alias("race", "champion").version) == "2"
    assert "promotion.decision" not in tracker.client.get_model_version("race", "2").tags
