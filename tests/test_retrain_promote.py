"""The retrain flow with `registry.auto_promote` on the embedded default: the version carries its whole lineage,
the flow run has its summary and eval-samples artifacts, the chained promotion makes the first version champion,
and a second clone with only the config pulls exactly that version's dataset and model back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.prefect_artifacts import flow_run_artifacts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
NAME = "vlmops-demo"


@pytest.fixture(scope="module")
def promoted_run(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> dict[str, Any]:
    """One retrain run (a smaller demo) with auto_promote, and the Prefect artifacts of it and its promotion."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.retrain import retrain

    tmp = tmp_path_factory.mktemp("flow")
    overrides = [
        f"run.output_dir={tmp}/outputs",
        f"model.cache_dir={tmp}/outputs/cache",
        f"tracking.uri=sqlite:///{tmp}/outputs/mlflow.db",
        "registry.auto_promote=true",
        "data.demo.num_train=64",
        "data.demo.num_eval=8",
        "train.epochs=2",
    ]
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp / "prefect-storage"}):
        summary = retrain(str(ROOT / "pipeline.yaml"), overrides)
        client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"], registry_uri=summary["mlflow_tracking_uri"])
        version = client.get_model_version(NAME, summary["model_version"])
        promotion = client.get_run(version.tags["promotion.run_id"])
        artifacts = {
            "retrain": flow_run_artifacts(version.tags["prefect_flow_run_id"]),
            "promote": flow_run_artifacts(promotion.data.tags["prefect_flow_run_id"]),
        }
    return {"summary": summary, "tmp": tmp, "client": client, "artifacts": artifacts}


def test_the_first_version_is_promoted_by_the_chained_gate(promoted_run: dict[str, Any]) -> None:
    summary, client = promoted_run["summary"], promoted_run["client"]
    assert summary["promotion"] == "promoted" and summary["model_version"] == "1"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert json.loads(Path(summary["summary_file"]).read_text())["promotion"] == "promoted"


def test_the_version_carries_its_lineage(promoted_run: dict[str, Any]) -> None:
    summary, client = promoted_run["summary"], promoted_run["client"]
    tags = client.get_model_version(NAME, summary["model_version"]).tags
    parent = client.get_run(summary["mlflow_run_id"]).data.tags
    assert tags["git_commit"] == parent["git_commit"] and tags["git_commit"] != "unknown"
    assert tags["prefect_flow_run_id"] == parent["prefect_flow_run_id"] != ""
    assert tags["prefect_deployment"] == "none"  # called directly, not from a deployment
    assert tags["base_model.id"].endswith("tiny-deepseek-vl") and tags["base_model.source"] == "local"
    assert tags["base_model.revision"] and len(tags["base_model.manifest_hash"]) == 64
    config_text = (Path(summary["run_dir"]) / "config.yaml").read_text()
    assert tags["config.hash"] == hashlib.sha256(config_text.encode()).hexdigest()
    assert tags["dvc.dataset.md5"] == summary["dataset_dvc_md5"] and tags["dvc.model.md5"] == summary["model_dvc_md5"]
    assert tags["dvc.remote"] == str(promoted_run["tmp"] / "outputs" / "dvc-remote")
    assert Path(tags["dataset.path"]).is_dir() and tags["dataset.hash"]
    assert tags["mlflow_run_id"] == summary["mlflow_run_id"]
    assert tags["promotion.decision"] == "promoted" and tags["promotion.against"] == "none"


def test_retrain_and_promote_runs_have_their_artifacts(promoted_run: dict[str, Any]) -> None:
    summary = promoted_run["summary"]
    retrain, promote = promoted_run["artifacts"]["retrain"], promoted_run["artifacts"]["promote"]
    assert set(retrain) == {"retrain-summary", "retrain-eval-samples"}
    markdown = retrain["retrain-summary"]
    assert markdown.type == "markdown"
    assert f"/runs/{summary['mlflow_run_id']}" in markdown.data and f"/#/models/{NAME}/versions/1" in markdown.data
    assert "Promotion: promoted" in markdown.data
    rows = json.loads(retrain["retrain-eval-samples"].data)
    assert retrain["retrain-eval-samples"].type == "table" and len(rows) == 8
    assert set(rows[0]) == {"image", "prompt", "reference", "finetuned", "finetuned correct", "base", "base correct"}
    evaluation = [json.loads(line) for line in (Path(summary["run_dir"]) / "eval" / "predictions.jsonl").open()]
    assert [r["finetuned"] for r in rows] == [e["prediction"] for e in evaluation]
    assert sum(r["finetuned correct"] for r in rows) / 8 == summary["finetuned_accuracy"]
    assert set(promote) == {"promote-decision", "promote-eval-samples"}
    assert "**promoted**" in promote["promote-decision"].data


def test_a_second_clone_pulls_the_champion(
    promoted_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmops.cli.main import main

    summary = promoted_run["summary"]
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "pipeline.yaml").write_text(yaml.safe_dump({"tracking": {"uri": summary["mlflow_tracking_uri"]}}))
    monkeypatch.chdir(clone)
    assert main(["pull", f"models:/{NAME}@champion"]) == 0
    pulled = clone / "outputs" / "pulled" / f"{NAME}-v1"
    tags = promoted_run["client"].get_model_version(NAME, "1").tags

    def digests(folder: Path) -> dict[str, str]:
        return {
            p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*")
            if p.is_file()
        }

    assert digests(pulled / "model") == digests(Path(summary["run_dir"]) / "merged")
    assert digests(pulled / "dataset") == digests(Path(tags["dataset.path"]))


def test_a_failed_promotion_still_leaves_the_summary(
    tmp_path: Path, prefect_harness: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """auto_promote's gate failing (here: registry.promotion.eval_file is not there) fails the run after the summary
    of what it trained, scored and registered is written, with the failure in it; `vlmops run` prints it, headed
    so."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.retrain import PromotionFailed, run_from_cli

    missing = tmp_path / "missing.jsonl"
    overrides = [
        f"run.output_dir={tmp_path}/outputs",
        f"model.cache_dir={tmp_path}/outputs/cache",
        f"tracking.uri=sqlite:///{tmp_path}/outputs/mlflow.db",
        "registry.auto_promote=true",
        f"registry.promotion.eval_file={missing}",
        "versioning.enabled=false",
        "eval.evaluate_base=false",
        "data.demo.num_train=8",
        "data.demo.num_eval=2",
        "train.epochs=1",
    ]
    failed = pytest.raises(PromotionFailed, match=r"(?s)version 1 was trained and registered.*promote --challenger 1")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}), failed:
        run_from_cli(str(ROOT / "pipeline.yaml"), overrides)
    [summary_file] = (tmp_path / "outputs" / "runs").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["model_version"] == "1" and summary["finetuned_accuracy"] is not None
    assert summary["promotion"] == f"failed: FileNotFoundError: registry.promotion.eval_file: {missing} does not exist"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/outputs/mlflow.db")
    flow_run = client.get_run(summary["mlflow_run_id"]).data.tags["prefect_flow_run_id"]
    markdown = flow_run_artifacts(flow_run)["retrain-summary"].data
    assert f"Promotion: {summary['promotion']}" in markdown and markdown.splitlines()[0].endswith("(promotion failed)")
    printed = capsys.readouterr().out
    assert "vlmops retrain: trained and registered; the promotion failed" in printed and str(summary_file) in printed
