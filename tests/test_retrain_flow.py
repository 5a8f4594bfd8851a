"""The retrain flow end to end on the embedded default, under Prefect's test harness.

A real MLflow SQLite store, a real DVC repository and remote, the shipped pipeline.yaml; the assertions
read what the run left behind. A second run must reuse the cached download and validation. A `gpu` test runs the
flow once more where CUDA is, through each step's GPU path.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vlmops.hashing import sha256_file
from vlmops.versioning import POINTER_FILE, cache_object_path, read_dvc_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def retrain_runs(tmp: Path, count: int, *extra: str) -> list[dict]:
    """`count` runs of the retrain flow on the shipped pipeline.yaml, one after another, everything they write (outputs,
    MLflow store, model cache, Prefect's result storage) under `tmp`; `extra`: more overrides. Runs into the same `tmp`
    share the cached steps."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.retrain import retrain

    overrides = [
        f"run.output_dir={tmp}/outputs",
        f"model.cache_dir={tmp}/outputs/cache",
        f"tracking.uri=sqlite:///{tmp}/outputs/mlflow.db",
        *extra,
    ]
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp / "prefect-storage"}):
        return [retrain(str(ROOT / "pipeline.yaml"), overrides) for _ in range(count)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> tuple[Path, dict, dict, list[str]]:
    tmp = tmp_path_factory.mktemp("flow")
    (first,) = retrain_runs(tmp, 1)
    # The second run answers for what a rerun reuses (the same model and data: download and validation cached) and
    # for a second version; its training need not learn, so it is cut short (the first run is the embedded default).
    (second,) = retrain_runs(tmp, 1, "train.max_steps=4", "eval.evaluate_base=false")
    return tmp / "outputs", first, second, _task_states(second)


def _task_states(summary: dict) -> list[str]:
    """Names of the task-run states of the flow run that produced `summary` (read from Prefect's API)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    flow_run_id = client.get_run(summary["mlflow_run_id"]).data.tags["prefect_flow_run_id"]

    async def read() -> list[str]:
        async with get_client() as prefect:
            runs = await prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [f"{r.name.rsplit('-', 1)[0]}:{r.state_name}" for r in runs]

    return asyncio.run(read())


def test_accuracy_and_summary(two_runs: tuple[Path, dict, dict, list[str]]) -> None:
    _, first, _, _ = two_runs
    assert first["finetuned_accuracy"] >= 0.9
    assert first["base_accuracy"] <= 0.3
    summary = json.loads(Path(first["summary_file"]).read_text())
    for key in ("base_accuracy", "finetuned_accuracy", "model_name", "model_version", "mlflow_run_id"):
        assert key in summary
    assert summary["model_name"] == "vlmops-demo"


def test_mlflow_runs_metrics_and_model_version(two_runs: tuple[Path, dict, dict, list[str]]) -> None:
    _, first, second, _ = two_runs
    client = MlflowClient(tracking_uri=first["mlflow_tracking_uri"], registry_uri=first["mlflow_tracking_uri"])
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.params["train.mode"] == "lora"
    assert parent.data.metrics["finetuned_accuracy"] == first["finetuned_accuracy"]
    assert parent.data.tags["git_commit"]
    assert parent.data.tags["prefect_flow_run_id"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    steps = {r.info.run_name: r for r in children}
    assert set(steps) == {"download_model", "validate_dataset", "train", "merge", "batch_infer", "evaluate", "register"}
    assert all(r.info.status == "FINISHED" for r in children)
    train = steps["train"]
    losses = client.get_metric_history(train.info.run_id, "loss")
    assert len(losses) >= 10
    assert losses[-1].value < losses[0].value
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert "loss_curve.png" in artifacts
    assert {a.path for a in client.list_artifacts(steps["validate_dataset"].info.run_id, "validation")} >= {
        "validation/report.json",
        "validation/token_lengths.png",
    }
    assert steps["merge"].data.metrics["parity_max_abs_diff"] <= steps["merge"].data.metrics["parity_atol"]
    # the model version, its alias and its lineage tags
    version = client.get_model_version_by_alias("vlmops-demo", "challenger")
    assert str(version.version) == second["model_version"] == "2"
    assert first["model_version"] == "1"
    assert version.tags["dvc.dataset.md5"].endswith(".dir")
    assert version.tags["dvc.model.md5"].endswith(".dir")
    assert version.tags["git_commit"]
    assert version.run_id == steps_of(client, second["mlflow_run_id"])["register"]


def steps_of(client: MlflowClient, parent_id: str) -> dict[str, str]:
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r.info.run_id for r in children}


def test_dvc_files_and_pushed_objects(two_runs: tuple[Path, dict, dict, list[str]]) -> None:
    outputs, first, _, _ = two_runs
    dvc_files = sorted(outputs.rglob("*.dvc"))
    dataset_files = [f for f in dvc_files if f.parent.name == "datasets"]
    model_files = [f for f in dvc_files if f.name == "merged.dvc"]
    assert len(dataset_files) == 1  # the same snapshot both times
    assert len(model_files) == 2
    remote = outputs / "dvc-remote"
    client = MlflowClient(tracking_uri=first["mlflow_tracking_uri"])
    tags = client.get_run(first["mlflow_run_id"]).data.tags
    for dvc_file in [*dataset_files, *model_files]:
        version = read_dvc_file(dvc_file)
        assert cache_object_path(remote, version.md5).is_file(), dvc_file
    assert tags["dvc.dataset.md5"] == read_dvc_file(dataset_files[0]).md5
    assert first["dataset_dvc_md5"] == tags["dvc.dataset.md5"]


def test_second_run_reuses_download_and_validation(two_runs: tuple[Path, dict, dict, list[str]]) -> None:
    _, first, second, states = two_runs
    assert "download_model:Cached" in states
    assert "validate_dataset:Cached" in states
    assert "train:Completed" in states
    client = MlflowClient(tracking_uri=second["mlflow_tracking_uri"])
    steps = steps_of(client, second["mlflow_run_id"])
    assert client.get_run(steps["download_model"]).data.tags["cached"] == "True"
    assert client.get_run(steps["validate_dataset"]).data.tags["cached"] == "True"
    assert client.get_run(steps_of(client, first["mlflow_run_id"])["download_model"]).data.tags["cached"] == "False"


def test_evaluation_has_the_layout_vlmops_eval_writes(two_runs: tuple[Path, dict, dict, list[str]]) -> None:
    _, first, _, _ = two_runs
    evaluation = Path(first["run_dir"]) / "eval"
    assert sorted(p.name for p in evaluation.iterdir()) == [
        "base_predictions.jsonl",
        "comparison.json",
        "comparison.png",
        "metrics.json",
        "predictions.jsonl",
    ]
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["finetuned"]["accuracy"] == first["finetuned_accuracy"]
    assert metrics["comparison"]["base_accuracy"] == first["base_accuracy"]


def test_a_model_is_stored_once_and_loads_from_the_registry(
    two_runs: tuple[Path, dict, dict, list[str]], tmp_path: Path
) -> None:
    from vlmops.infer.chat import ChatModel

    outputs, _, second, _ = two_runs
    merged = sorted(outputs.glob("runs/*/merged"))
    assert len(merged) == 2
    weights = {sha256_file(p): p.stat().st_size for folder in merged for p in folder.glob("*.safetensors")}
    assert weights
    # Every copy of the merged weights' bytes anywhere under outputs/, a hardlinked file counted once.
    copies: dict[str, set[tuple[int, int]]] = defaultdict(set)
    sizes = set(weights.values())
    for path in outputs.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size in sizes:
            digest = sha256_file(path)
            if digest in weights:
                copies[digest].add((path.stat().st_dev, path.stat().st_ino))
    assert set(copies) == set(weights)
    # at most the run's working copy (one inode with DVC's cache) and the DVC remote's
    assert all(len(inodes) <= 2 for inodes in copies.values()), copies

    # The registered version is a pointer to the pushed copy; loading it pulls the same bytes back.
    client = MlflowClient(tracking_uri=second["mlflow_tracking_uri"], registry_uri=second["mlflow_tracking_uri"])
    version = client.get_model_version_by_alias("vlmops-demo", "challenger")
    assert [a.path for a in client.list_artifacts(version.run_id, "model")] == [f"model/{POINTER_FILE}"]
    loaded = ChatModel.load(
        "models:/vlmops-demo@challenger", tracking_uri=second["mlflow_tracking_uri"], cache_dir=tmp_path
    )
    run_weights = {p.name: sha256_file(p) for p in (Path(second["run_dir"]) / "merged").glob("*.safetensors")}
    assert {p.name: sha256_file(p) for p in loaded.loaded.path.glob("*.safetensors")} == run_weights


@pytest.mark.gpu
@pytest.mark.timeout(1800)
def test_retrain_flow_on_cuda(tmp_path: Path, prefect_harness: None) -> None:
    """Every step's CUDA path, which the CPU runs above cannot reach: training in bf16 with compiled layers, the merge
    (written in bf16, proved in float32), the eval split answered by the fast engine (base and fine-tuned), and the
    registration. Bugs in those paths (a merge checked in bf16, an adapter merged under the eval's base step) were
    found by reading the code, not by a test."""
    (summary,) = retrain_runs(tmp_path, 1, "infer.fast_min_records=0")  # the fast engine for the tiny eval split

    assert summary["finetuned_accuracy"] > summary["base_accuracy"]
    merged = json.loads((Path(summary["run_dir"]) / "merged" / "config.json").read_text())
    assert (merged.get("dtype") or merged.get("torch_dtype")) == "bfloat16"  # model.dtype auto on CUDA
    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    steps = {name: client.get_run(run_id) for name, run_id in steps_of(client, summary["mlflow_run_id"]).items()}
    assert all(run.info.status == "FINISHED" for run in steps.values())
    merge = steps["merge"].data.metrics
    assert merge["parity_max_abs_diff"] <= merge["parity_atol"] == 1e-3
    # the registry's own version is an int over a database store and a string over a server (summaries: strings)
    assert str(client.get_model_version_by_alias("vlmops-demo", "challenger").version) == summary["model_version"]


def test_validation_is_not_reused_after_an_image_in_an_allowed_root_changed(
    tmp_path: Path, prefect_harness: None, tiny_model: Path
) -> None:
    """The validate step's cache follows the images it reads outside the dataset's folder (data.allowed_roots, a
    shared mount): a changed image there is validated again, not served from the older snapshot."""
    from PIL import Image
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.validate import validate_dataset
    from vlmops.config import DataConfig, StorageConfig

    shared, data = tmp_path / "shared", tmp_path / "data"
    shared.mkdir()
    data.mkdir()
    Image.new("RGB", (32, 32), "red").save(shared / "shape.png")
    record = {
        "conversations": [
            {"from": "user", "value": f"<img>{shared / 'shape.png'}</img>Colour?"},
            {"from": "assistant", "value": "red"},
        ]
    }
    for name in ("train.jsonl", "eval.jsonl"):
        (data / name).write_text(json.dumps(record) + "\n")
    config = DataConfig(allowed_roots=[str(shared)])
    args = (config, str(data / "train.jsonl"), str(data / "eval.jsonl"), str(tiny_model), str(tmp_path / "datasets"))

    @flow
    def validate_twice() -> list[tuple[str | None, Path]]:
        states = []
        for colour in ("red", "blue"):
            Image.new("RGB", (32, 32), colour).save(shared / "shape.png")
            state = validate_dataset(*args, None, StorageConfig(), 0, return_state=True)
            states.append((state.name, state.result().path))
        return states

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        (first, red), (second, blue) = validate_twice()
    assert first != "Cached" and second != "Cached"
    assert red != blue
    [image] = (blue / "images").iterdir()
    assert Image.open(image).getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("repo", ["checkout", "outputs"])
def test_validation_is_reused_with_the_outputs_inside_the_dataset_folder(
    repo: str, tmp_path: Path, prefect_harness: None, tiny_model: Path
) -> None:
    """A dataset file in the checkout, where outputs/ is too (`--param overrides='["data.train=new.jsonl"]'`, as
    prefect.yaml's retrain/on-demand says), with its rejects file beside it, and the checkout or outputs/ (the default)
    as versioning.repo: what the runs write there (the snapshot, the rejects, run folders, DVC's .dvc/, .dvcignore and
    the lock beside the repository) is not what the validation reads, so the next run's validation is Cached; an image
    changed beside the dataset is still validated again."""
    from PIL import Image
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.validate import validate_dataset
    from vlmops.config import DataConfig, StorageConfig
    from vlmops.versioning import DvcStore

    checkout = tmp_path / "checkout"
    (checkout / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(checkout / "images" / "red.png")
    record = {
        "conversations": [
            {"from": "user", "value": "<img>images/red.png</img>Colour?"},
            {"from": "assistant", "value": "red"},
        ]
    }
    lines = [json.dumps(record)] * 10 + ['{"conversations": "not a list"}']
    (checkout / "new.jsonl").write_text("\n".join(lines) + "\n")
    data = DataConfig(train="new.jsonl", invalid_records="skip", rejects_file=str(checkout / "rejects.jsonl"))
    output_dir = checkout / "outputs"
    dvc = DvcStore(checkout if repo == "checkout" else output_dir, "local", str(output_dir / "dvc-remote"))
    dvc_writes = [str(path) for path in dvc.writes()]

    @flow
    def three_runs() -> list[str | None]:
        states = []
        for run in ("first", "second", "third"):
            if run == "third":
                Image.new("RGB", (32, 32), "blue").save(checkout / "images" / "red.png")
            state = validate_dataset(
                data, str(checkout / "new.jsonl"), None, str(tiny_model), str(output_dir), None, StorageConfig(), 0,
                dvc_writes, return_state=True,
            )  # fmt: skip
            assert state.result().report.rejected_count == 1
            if run == "first":
                dvc.track(state.result().path)  # as the flow versions the snapshot: dvc init, add, push
            (output_dir / "runs" / run).mkdir(parents=True)  # what the rest of a retrain run writes
            (output_dir / "runs" / run / "config.yaml").write_text("run: {}\n")
            states.append(state.name)
        return states

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        first, second, third = three_runs()
    assert (first, second, third) == ("Completed", "Cached", "Completed")
