"""`ChatModel.load("models:/NAME@ALIAS")` against a real MLflow SQLite store with file artifacts."""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.http_remote import http_remote
from vlmops.config import TrackingConfig
from vlmops.infer import resolve
from vlmops.infer.chat import ChatModel
from vlmops.infer.resolve import REGISTRY_MANIFEST, resolve_model_ref
from vlmops.models.tiny import build_tiny_model
from vlmops.tracking import Tracker
from vlmops.versioning import POINTER_FILE, DvcStore, write_pointer

NAME = "vlmops-test"


def register(tracking_uri: str, model_dir: Path, alias: str, name: str = NAME) -> str:
    """Log `model_dir` as plain run artifacts and register them as a new version of `name` with `alias`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("registry").experiment_id) as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("registry", artifact_location=(root / "artifacts").as_uri())
    yield uri
    mlflow.set_tracking_uri(None)


def test_load_registered_model_by_alias_and_version(
    registry: str, tiny_model: Path, images: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    query = f"<img>{images['red']}</img>What colour is the shape?"
    assert register(registry, tiny_model, "champion") == "1"
    cache = tmp_path / "cache"

    champion = ChatModel.load(f"models:/{NAME}@champion", tracking_uri=registry, cache_dir=cache)
    downloaded = champion.loaded.path
    assert downloaded.is_relative_to(cache) and (downloaded / "config.json").is_file()
    assert champion.chat(query)[0] == ChatModel.load(tiny_model).chat(query)[0]  # the same weights came back

    # The same version again, by number: served from the cache, not downloaded twice.
    caplog.set_level(logging.INFO, logger="vlmops.infer.resolve")
    caplog.clear()  # what the calls above logged (vlmops's INFO lines show once flows is imported)
    assert resolve_model_ref(f"models:/{NAME}/1", tracking_uri=registry, cache_dir=cache) == downloaded
    assert "cached at" in caplog.text and "downloading" not in caplog.text

    # Moving the alias to a new version is seen on the next load.
    other = build_tiny_model(tmp_path / "other", "deepseek_vl", seed=5)
    assert register(registry, other, "champion") == "2"
    moved = ChatModel.load(f"models:/{NAME}@champion", tracking_uri=registry, cache_dir=cache)
    assert moved.loaded.path != downloaded and "v2" in moved.loaded.path.parts
    assert moved.chat(query)[0] == ChatModel.load(other).chat(query)[0]

    # A damaged cache entry (manifest without the checkpoint) is downloaded again, not trusted.
    shutil.rmtree(downloaded)
    assert (downloaded.parent / REGISTRY_MANIFEST).is_file()
    again = resolve_model_ref(f"models:/{NAME}/1", tracking_uri=registry, cache_dir=cache)
    assert (again / "config.json").is_file()


def test_processes_that_need_a_version_at_once_download_it_once_and_share_the_copy(
    registry: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distributed job's task workers on one machine load its model as the job starts: one downloads, the others
    wait for it and use its copy (before, each downloaded the version and published its copy over the folder another
    was reading). Two threads stand for the processes: each takes the lock on a descriptor of its own."""
    version = register(registry, tiny_model, "shared")
    cache = tmp_path / "cache"
    downloads: list[str] = []

    def slow_download(source: str, dst: Path, tracking_uri: str | None) -> str:
        downloads.append(source)
        time.sleep(1.0)  # long enough for the other caller to find no copy yet
        return real_download(source, dst, tracking_uri)

    real_download = resolve._download
    monkeypatch.setattr(resolve, "_download", slow_download)
    with ThreadPoolExecutor(2) as pool:
        found = list(
            pool.map(
                lambda _: resolve_model_ref(f"models:/{NAME}/{version}", tracking_uri=registry, cache_dir=cache),
                range(2),
            )
        )
    assert len(downloads) == 1, downloads
    assert found[0] == found[1] and (found[0] / "config.json").is_file()


def test_registry_errors_name_the_model(registry: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"models:/nobody@champion: not found in the registry"):
        resolve_model_ref("models:/nobody@champion", tracking_uri=registry, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="write a registered model as models:/NAME@ALIAS or models:/NAME/VERSION"):
        resolve_model_ref(f"models:/{NAME}/latest/extra", tracking_uri=registry, cache_dir=tmp_path)


def test_a_version_pointing_at_the_dvc_remote_is_pulled_from_there(
    registry: str, tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    """The flow registers a pointer to the pushed copy, not the weights: loading pulls them from DVC."""
    workspace = tmp_path / "outputs"
    shutil.copytree(tiny_model, workspace / "merged")
    pushed = DvcStore(workspace, "local", str(tmp_path / "remote")).track(workspace / "merged")
    tracker = Tracker(TrackingConfig(uri=registry, experiment="registry"))
    with tracker.run("register") as run_id:
        pointer = tmp_path / "pointer"
        write_pointer(pushed, pointer)
        first = tracker.register_model(run_id, pointer, "vlmops-dvc", "challenger")
        retried = tracker.register_model(run_id, pointer, "vlmops-dvc", "challenger")
    assert retried.version == first.version == "1"  # a retried register makes no second version
    artifacts = tracker.client.list_artifacts(run_id, "model")
    assert [a.path for a in artifacts] == [f"model/{POINTER_FILE}"]  # a few hundred bytes, not the weights

    shutil.rmtree(workspace)  # the run folder and its DVC cache are gone: only the remote has the model
    query = f"<img>{images['red']}</img>What colour is the shape?"
    loaded = ChatModel.load("models:/vlmops-dvc@challenger", tracking_uri=registry, cache_dir=tmp_path / "cache")
    assert (loaded.loaded.path / "config.json").is_file()
    assert not list((tmp_path / "cache").rglob(".dvc"))  # the pull's own cache was removed
    assert loaded.chat(query)[0] == ChatModel.load(tiny_model).chat(query)[0]


def test_a_version_in_a_dvc_remote_behind_a_password_is_pulled_with_the_configs(
    registry: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The pointer a version registers names its http DVC remote with the password masked; a command's model loading
    (`catalog_resolver`) takes the password from the config's versioning.remote_url, and says where to give it when
    the config names no such remote."""
    from vlmops.config import PipelineConfig
    from vlmops.errors import UserInputError
    from vlmops.infer.resolve import catalog_resolver

    password = "s3cret-dvc-pw"
    workspace = tmp_path / "outputs"
    shutil.copytree(tiny_model, workspace / "merged")
    with http_remote(tmp_path / "remote", login=("vlmops", password)) as host:
        url = f"http://vlmops:{password}@{host}/dvc"
        pushed = DvcStore(workspace, "team", url).track(workspace / "merged")
        tracker = Tracker(TrackingConfig(uri=registry, experiment="registry"))
        with tracker.run("register") as run_id:
            write_pointer(pushed, tmp_path / "pointer")
            tracker.register_model(run_id, tmp_path / "pointer", "vlmops-dvc-http", "challenger")
        assert password not in (tmp_path / "pointer" / POINTER_FILE).read_text()
        shutil.rmtree(workspace)

        def config(**versioning: str) -> PipelineConfig:
            return PipelineConfig.model_validate(
                {
                    "tracking": {"uri": registry, "experiment": "registry"},
                    "model": {"cache_dir": str(tmp_path / "cache" / str(len(versioning)))},
                    "versioning": versioning,
                }
            )

        loaded = catalog_resolver(config(remote_url=url))("models:/vlmops-dvc-http@challenger")
        assert (loaded / "config.json").is_file()
        with pytest.raises(
            UserInputError, match=rf"^the DVC remote http://vlmops:\*\*\*@{host}/dvc needs its password"
        ):
            catalog_resolver(config())("models:/vlmops-dvc-http@challenger")


def test_a_retrain_flow_run_folder_resolves_to_the_model_it_made(tiny_model: Path, tmp_path: Path) -> None:
    """`vlmops app --model outputs/runs/<run>` (or infer, batch-infer): the retrain flow's run folder holds its
    config, train/, merged/ and eval/, and the model it made is merged/; a checkpoint named so stays itself."""
    import shutil

    run = tmp_path / "runs" / "20261205-010000-ab12"
    (run / "train").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {}\n")
    shutil.copytree(tiny_model, run / "merged")
    assert resolve_model_ref(str(run)) == run / "merged"
    assert resolve_model_ref(str(run / "merged")) == run / "merged"
    assert resolve_model_ref(str(tiny_model)) == tiny_model


def test_batch_infer_answers_with_a_registered_versions_saved_settings(
    registry: str, tiny_model: Path, tmp_path: Path
) -> None:
    """`vlmops batch-infer --model models:/...` of a version the retrain flow registered (its merged model, with the
    config it was made with) answers with that config's generation settings and system prompt, as
    `ChatModel.load` does, where the command line does not set them (`--set infer.max_new_tokens` wins). It used the
    built-in defaults (64 new tokens, no repetition penalty, the released system prompt)."""
    import json

    from vlmops.cli.main import main
    from vlmops.config import dump_config, load_config
    from vlmops.train.rundir import CONFIG_FILE, RunInfo

    merged = tmp_path / "merged"
    shutil.copytree(tiny_model, merged)
    saved = ["infer.max_new_tokens=3", "infer.repetition_penalty=1.3", "model.system_prompt=Answer in colours."]
    (merged / CONFIG_FILE).write_text(dump_config(load_config(None, saved)))
    RunInfo(str(tiny_model), str(tmp_path), "test", "full", merged_from=str(tmp_path / "final")).write(merged)
    version = register(registry, merged, "saved")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "query": "Say hello."}) + "\n")

    settings = [f"tracking.uri={registry}", f"model.cache_dir={tmp_path / 'cache'}", "infer.max_new_tokens=2"]
    args = ["--input", str(prompts), "--output", str(tmp_path / "answers"), *(f"--set={s}" for s in settings)]
    assert main(["batch-infer", "--model", f"models:/{NAME}/{version}", *args]) == 0
    manifest = json.loads((tmp_path / "answers" / "manifest.json").read_text())
    assert manifest["settings"]["max_new_tokens"] == 2  # the command line's
    assert manifest["settings"]["repetition_penalty"] == 1.3  # the version's
    assert manifest["settings"]["system_prompt"] == "Answer in colours."


def test_a_promotion_while_a_job_runs_puts_no_other_version_on_its_workers(
    registry: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The alias moves (`vlmops promote`) after a job over `models:/NAME@champion` was planned and while its shards
    are answered by the task workers of the `gpu` pool, each handed the reference as the batch-inference flow hands it.
    A worker that loaded the model before the promotion answered with version 1; one that started after it looked the
    alias up again, found version 2 and failed its shard (another content hash), so the job could not finish. Now every
    shard is answered with the version the job was planned with, the results and the manifest say which (the alias as
    the user named it, and version 1), and the next job through the alias gets version 2 on the same worker."""
    from vlmops.config import load_config
    from vlmops.infer import batch_job
    from vlmops.infer.planning import folder_hash

    name, alias = "vlmops-moving", "models:/vlmops-moving@champion"
    assert register(registry, tiny_model, "champion", name) == "1"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": "r{i}", "query": "Say {i}."}}\n' for i in range(6)))
    config = load_config(
        None,
        [
            f"tracking.uri={registry}",
            f"model.cache_dir={tmp_path / 'cache'}",
            "infer.max_new_tokens=2",
            "infer.shard_size=2",
        ],
    )
    _, plan, output, config = batch_job.prepare_job(alias, str(prompts), str(tmp_path / "out"), config)
    assert (plan.model.uri, plan.model.version) == (alias, "1")
    assert plan.model.content_hash == f"sha256:{folder_hash(tiny_model)}"
    first, second, third = plan.shards
    try:
        assert batch_job.run_job_shard(alias, output.uri, config, first.index).results == 2  # before the promotion
        other = build_tiny_model(tmp_path / "other", "deepseek_vl", seed=5)
        assert register(registry, other, "champion", name) == "2"
        assert batch_job.run_job_shard(alias, output.uri, config, second.index).results == 2  # the same worker
        batch_job._WORKER_RUNNER.clear()  # a worker process that starts after the promotion
        assert batch_job.run_job_shard(alias, output.uri, config, third.index).results == 2
        result = batch_job.complete_job(plan, output, [], config)
        assert result.manifest["model"] == plan.model.as_dict()
        answered = [
            json.loads(line)
            for p in sorted((tmp_path / "out").glob("part-*.jsonl"))
            for line in p.read_text().splitlines()
        ]
        assert len(answered) == 6 and all(r["model"] == plan.model.as_dict() for r in answered)

        # The next job through the alias takes it where it is now, on the same worker.
        _, moved, moved_output, _ = batch_job.prepare_job(alias, str(prompts), str(tmp_path / "next"), config)
        assert (moved.model.uri, moved.model.version) == (alias, "2")
        assert moved.model.content_hash == f"sha256:{folder_hash(other)}"
        for shard in moved.shards:
            assert batch_job.run_job_shard(alias, moved_output.uri, config, shard.index).results == 2
    finally:
        batch_job._WORKER_RUNNER.clear()


def test_a_job_resumed_after_its_alias_moved_is_refused_naming_the_version_it_started_with(
    registry: str, tiny_model: Path, tmp_path: Path
) -> None:
    """`vlmops batch-infer --model models:/NAME@champion` stopped part way (here a trial run), then a promotion, then
    the same command: the alias names another model, so another job, and the output holds the first: refused, now
    naming the two versions and the reference that finishes the first job (it said only `model X (sha256:...) vs X
    (sha256:...)`, the same URI twice). That reference finishes it, recorded as the alias at version 1."""
    from vlmops.config import load_config
    from vlmops.infer.batch_job import run_batch_job
    from vlmops.infer.job_output import JobMismatchError
    from vlmops.infer.job_status import StoppedJob

    name, alias = "vlmops-resumed", "models:/vlmops-resumed@champion"
    assert register(registry, tiny_model, "champion", name) == "1"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": "r{i}", "query": "Say {i}."}}\n' for i in range(4)))
    out = tmp_path / "out"
    settings = [f"tracking.uri={registry}", f"model.cache_dir={tmp_path / 'cache'}", "infer.max_new_tokens=2"]
    config = load_config(None, [*settings, "infer.shard_size=2"])
    trial = load_config(None, [*settings, "infer.shard_size=2", "infer.max_shards=1"])
    assert isinstance(run_batch_job(alias, str(prompts), str(out), trial, progress=False), StoppedJob)
    assert register(registry, build_tiny_model(tmp_path / "other", "deepseek_vl", seed=5), "champion", name) == "2"

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(
        JobMismatchError,
        match=rf"\(model {alias}: version 1 when the job started, version 2 now; to finish that job, name the version "
        rf"it started with, models:/{name}/1\)",
    ):
        run_batch_job(alias, str(prompts), str(out), config, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    done = run_batch_job(f"models:/{name}/1", str(prompts), str(out), config, progress=False)
    assert done.manifest["model"]["uri"] == alias and done.manifest["model"]["version"] == "1"
    assert [s.shard for s in done.ran] == [1]  # the trial's shard is not redone


def test_a_model_is_recorded_as_an_alias_only_where_it_is_a_version_of_that_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--model-named-as` (what the batch-inference flow passes its child with the version it looked an alias up to)
    names a pinned model, never another one: refused before the registry is asked or anything is written."""
    from vlmops.cli.main import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"query": "Say 1."}\n')
    args = ["-i", str(prompts), "-o", str(tmp_path / "out"), "--set", f"tracking.uri=sqlite:///{tmp_path}/none.db"]
    for model, named in [
        (f"models:/{NAME}/1", "models:/another@champion"),  # another registered model
        (f"models:/{NAME}@champion", f"models:/{NAME}@challenger"),  # not a version
        (f"models:/{NAME}/1", f"models:/{NAME}/2"),  # not an alias
        (str(tmp_path), f"models:/{NAME}@champion"),  # not a registered model
    ]:
        assert main(["batch-infer", "-m", model, "--model-named-as", named, *args]) == 2
        err = capsys.readouterr().err
        assert f"model {model} named as {named}: a model is named as the alias it was pinned from only" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "none.db").exists()


@pytest.mark.integration
def test_the_login_of_the_tracking_uri_is_in_no_registry_error_and_no_cache_file(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A team's tracking URI with its login in it (http://user:password@host): a version the registry lacks was
    refused with the URI as it was, password included, in an error the CLI, the chat page's log and Prefect's flow run
    state show; a version downloaded was cached with the URI, password included, written in its vlmops_registry.json
    (a cache on a shared disk). The cached copy is still reused."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow

    from vlmops.infer.resolve import registered_version

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root", str(tmp_path / "a"),
    ]  # fmt: skip
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        with pytest.raises(
            ValueError, match=rf"not found in the registry at http://ann:\*\*\*@127.0.0.1:{port}"
        ) as err:
            registered_version(f"models:/{NAME}@champion", f"http://ann:s3cret-pw@127.0.0.1:{port}")
        assert "s3cret-pw" not in str(err.value)

        login = f"http://ann:s3cret-pw@127.0.0.1:{port}"
        mlflow.MlflowClient(tracking_uri=login).create_experiment("registry")
        assert register(login, tiny_model, "champion") == "1"
        cache = tmp_path / "cache"
        downloaded = resolve_model_ref(f"models:/{NAME}@champion", tracking_uri=login, cache_dir=cache)
        assert (downloaded / "config.json").is_file()
        written = [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".txt")]
        assert written and not [p for p in written if "s3cret-pw" in p.read_text(errors="replace")]
        caplog.set_level(logging.INFO, logger="vlmops.infer.resolve")
        caplog.clear()  # what the calls above logged (vlmops's INFO lines show once flows is imported)
        assert resolve_model_ref(f"models:/{NAME}/1", tracking_uri=login, cache_dir=cache) == downloaded
        assert "cached at" in caplog.text and "downloading" not in caplog.text
    finally:
        mlflow.set_tracking_uri(None)
        server.terminate()
        server.wait(timeout=30)


def test_a_registry_that_does_not_answer_is_named_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracking server that is down: the lookup said 'not found in the registry' (a ValueError, exit 2 from the CLI),
    pointing at the model name; now it says the registry could not be reached (RunFailed, exit 1: run again)."""
    import socket

    from vlmops.errors import RunFailed
    from vlmops.infer.resolve import registered_version

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(
        RunFailed, match=rf"the registry at http://127.0.0.1:{port} could not be reached .*run again"
    ) as err:
        registered_version(f"models:/{NAME}@champion", f"http://127.0.0.1:{port}")
    assert "not found" not in str(err.value)
