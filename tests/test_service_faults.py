"""Service faults, with real servers: SeaweedFS (S3) and an `mlflow server` process (SQLite backend, artifacts in
S3) that the test stops in the middle of a flow run. The affected task retries with backoff, then the run fails
with a message naming MLflow and its URL; after a restart the rerun completes and nothing registered before is
lost. Two registrations at once get two distinct, complete versions. A batch inference job whose S3 output goes
away (a proxy in front of SeaweedFS stops at the job's second part) fails naming S3, in the flow and in
`vlmops batch-infer`, and the same job goes on once it is back, every record once; the job's child in the flow names
the outage without advising its own (temporary) command line. Any other `vlmops` command whose S3 or MLflow goes away
(`batch-status`, `infer --model models:/...`), or whose Prefect API does not answer (`promote`), names the server too,
with exit 1 and no traceback. A DVC push whose S3 goes away names the DVC remote."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.outage_proxy import OutageProxy
from tests.s3_server import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]


class MlflowServer:
    """`mlflow server` on a fixed loopback port, stopped and started again by the test."""

    def __init__(self, workdir: Path, s3: S3Server):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = {**os.environ, **s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url}
        client = s3.client()
        # The session's S3 outlives a test: another test's server made the bucket (run ids keep their artifacts apart).
        with suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket="mlflow-artifacts")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", "s3://mlflow-artifacts/store",
        ]  # fmt: skip
        log = (self.workdir / "mlflow-server.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {(self.workdir / 'mlflow-server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowServer]:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    # MLflow's client retries a refused connection for minutes on its own; the task's retries are under test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = MlflowServer(tmp_path, s3_server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_mlflow_outage_mid_flow_retries_names_the_server_and_a_rerun_completes(
    mlflow_server: MlflowServer, prefect_harness: None, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect import flow

    from tasks.register import register
    from tasks.retry import names_unreachable_service, retry_this_flow_run
    from vlmops.config import TrackingConfig
    from vlmops.outages import ServiceUnavailable
    from vlmops.tracking import Tracker

    model = tmp_path / "merged"
    model.mkdir()
    for i in range(3):
        (model / f"part-{i}.safetensors").write_bytes(os.urandom(50_000))
    tracker = Tracker(TrackingConfig(uri=mlflow_server.url, experiment="faults"))
    first_run, second_run = tracker.start_run("first"), tracker.start_run("second")

    @flow(name="register-twice")
    @names_unreachable_service(lambda: f"retry this flow run: {retry_this_flow_run(__file__, 'register_twice')}")
    def register_twice(between: Callable[[], None]) -> str:
        register(tracker, first_run, str(model), "faults-model", "challenger", {})
        between()  # the MLflow server goes away in the middle of the flow run
        return register(tracker, second_run, str(model), "faults-model", "challenger", {}).version

    state = register_twice(mlflow_server.stop, return_state=True)
    assert state.is_failed()
    # The advice names this flow run, and (a run of no deployment) the entrypoint `prefect flow-run retry` needs.
    entrypoint = re.escape(f"{Path(__file__).resolve()}:register_twice")
    retry = (
        rf"retry this flow run: `prefect flow-run retry {state.state_details.flow_run_id} --entrypoint {entrypoint}`"
    )
    with pytest.raises(ServiceUnavailable, match=rf"(?s)MLflow at {mlflow_server.url} did not answer.*\n.*{retry}"):
        state.result()
    runs = sorted(_task_runs(state.state_details.flow_run_id), key=lambda r: r.expected_start_time)
    assert [(r.state_name, r.run_count) for r in runs] == [("Completed", 1), ("Failed", 3)]  # 2 retries

    mlflow_server.start()
    assert register_twice(lambda: None) == "2"  # the retry of the first step reuses version 1
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    versions = client.search_model_versions("name = 'faults-model'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    for v in versions:  # nothing lost: every version's files are in S3
        names = {a.path for a in client.list_artifacts(v.run_id, "model")}
        assert names == {f"model/{p.name}" for p in model.iterdir()}

    # Two registrations at once (two flow runs registering): two distinct, complete versions.
    runs_at_once = [tracker.start_run(f"concurrent-{i}") for i in range(2)]
    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda r=run: results.append(tracker.register_model(r, model, "faults-model", "challenger").version)
        )
        for run in runs_at_once
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["3", "4"]
    for run in runs_at_once:
        assert len(client.search_model_versions(f"name = 'faults-model' and run_id = '{run}'")) == 1
        assert len(client.list_artifacts(run, "model")) == 3


def test_s3_outage_mid_flow_retries_names_the_dvc_remote_and_a_rerun_completes_with_nothing_lost(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DVC remote is a bucket on SeaweedFS; S3 stops between two pushes of one flow run, and comes back on
    the same address with its data. The run names the DVC remote (and, in the S3 client's error, its endpoint)."""
    from contextlib import ExitStack

    from prefect import flow

    from tasks.retry import names_unreachable_service
    from tasks.version import version_path
    from tests.s3_server import free_ports, seaweedfs_s3
    from vlmops.config import load_config
    from vlmops.outages import ServiceUnavailable

    ports = free_ports(8)
    weed = tmp_path / "weed"
    workspace = tmp_path / "ws"
    folders = []
    for name in ("dataset", "model"):
        folder = workspace / name
        folder.mkdir(parents=True)
        (folder / "data.bin").write_bytes(os.urandom(20_000))
        folders.append(str(folder))
    config = load_config(
        None,
        [
            f"run.output_dir={workspace}",
            f"versioning.repo={workspace}",
            "versioning.remote_name=s3",
            "versioning.remote_url=s3://dvc/store",
        ],
    )

    @flow(name="push-twice")
    @names_unreachable_service(lambda: "run it again")
    def push_twice(between: Callable[[], None]) -> list[str]:
        first = version_path(config, folders[0])
        between()  # S3 goes away in the middle of the flow run
        return [first.md5, version_path(config, folders[1]).md5]

    with ExitStack() as running:
        s3 = running.enter_context(seaweedfs_s3(weed, ports=ports))
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        s3.client().create_bucket(Bucket="dvc")
        state = push_twice(running.close, return_state=True)
    assert state.is_failed()
    # The DVC remote is named, with the S3 client's error, which names the endpoint DVC asked (AWS_ENDPOINT_URL).
    remote = rf"^DVC remote at s3://dvc/store did not answer: \w+: [^\n]*{re.escape(s3.endpoint_url)}"
    where = r"\nstart it \(or fix versioning.remote_url in the config, or the endpoint in AWS_ENDPOINT_URL\)"
    with pytest.raises(ServiceUnavailable, match=rf"(?s){remote}.*{where}, then run it again$"):
        state.result()
    runs = sorted(_task_runs(state.state_details.flow_run_id), key=lambda r: r.expected_start_time)
    assert [(r.state_name, r.run_count) for r in runs] == [("Completed", 1), ("Failed", 3)]  # 2 retries

    with seaweedfs_s3(weed, ports=ports) as restarted:
        assert restarted.endpoint_url == s3.endpoint_url
        first, second = push_twice(lambda: None)
        keys = {o["Key"] for o in restarted.client().list_objects_v2(Bucket="dvc")["Contents"]}
    # Both folders are in the remote: the first push survived the outage, the second completed on the rerun.
    assert {f"store/files/md5/{md5[:2]}/{md5[2:]}" for md5 in (first, second)} <= keys


def test_promote_with_mlflow_down_names_the_server_once_on_its_own_and_inside_retrain(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promote flow (`vlmops promote`, promote/on-demand) with its registry out of reach: after the registry
    reads' retries the run fails naming MLflow and its URL (a RunFailed, exit 1), not with 'not found in the
    registry' (a ValueError, exit 2: the wrong fix); run by the retrain flow (auto_promote) it is named once."""
    from prefect import flow

    from flows.promote import promote
    from tasks.retry import names_unreachable_service
    from vlmops.outages import ServiceUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    overrides = [f"run.output_dir={tmp_path}", f"tracking.uri={url}"]
    config = str(Path(__file__).resolve().parents[1] / "pipeline.yaml")

    state = promote(config, overrides, return_state=True)
    assert state.is_failed()
    # What to run once it is back: a retry of this flow run (which goes on in its work folder), with its entrypoint.
    retry = rf"then retry this flow run to reuse .*`prefect flow-run retry {state.state_details.flow_run_id} "
    entrypoint = r"--entrypoint \S*flows/promote.py:promote`"
    # A retry whose config changed is refused (flows/run_folder.py): a fixed URL means a new run, and the advice says so.
    fixed = r".*A retry reads the flow run's config as it was: after fixing a URL in it, start a new run$"
    with pytest.raises(ServiceUnavailable, match=rf"(?s)^MLflow at {url} did not answer.*{retry}{entrypoint}{fixed}"):
        state.result()

    @flow(name="retrain-like")
    @names_unreachable_service(lambda: "retry this flow run")
    def around() -> None:
        promote(config, overrides)

    with pytest.raises(ServiceUnavailable, match=rf"^MLflow at {url} did not answer") as raised:
        around()
    assert str(raised.value).count("did not answer") == 1


def test_promote_logs_no_password_of_the_tracking_uri_in_prefect(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promote run (promote/on-demand, vlmops promote) whose config's tracking.uri carries a login, with MLflow out
    of reach: the logs Prefect keeps of it (its server's database, the UI), the tracebacks of the failed task and flow
    included, hold no password. MLflow's error names the URL it requested, login and all."""
    from flows.promote import promote

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"run:\n  output_dir: {tmp_path}\ntracking:\n  uri: http://alice:s3cretpassw0rd@127.0.0.1:{port}\n"
    )

    state = promote(str(config), return_state=True)
    assert state.is_failed()
    logs = _flow_run_logs(state.state_details.flow_run_id)
    assert any("Traceback" in message and f"alice:***@127.0.0.1:{port}" in message for message in logs), logs
    assert not [message for message in logs if "s3cretpassw0rd" in message]


def _flow_run_logs(flow_run_id: Any) -> list[str]:
    """The log messages Prefect keeps of a flow run (its server's database, the UI), its failures' tracebacks included."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in asyncio.run(read())]


@pytest.fixture
def s3_proxy(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[OutageProxy]:
    """The session's SeaweedFS behind a proxy the test stops (the job's `storage.endpoint_url`); its keys in the
    environment, as a job's child and workers read them."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    proxy = OutageProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    try:
        yield proxy
    finally:
        proxy.stop()


def _six_prompts(tmp_path: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "query": f"Question {i}?"}) + "\n" for i in range(6)))
    return prompts


def _parts(s3: S3Server, bucket: str) -> dict[str, tuple[str, Any, list[str]]]:
    """The job's parts on the server itself (not through the proxy): name -> (ETag, when it was written, the keys of
    its records). The same answers written again would have the same ETag, not the same time."""
    client = s3.client()
    found = {}
    for listed in client.list_objects_v2(Bucket=bucket, Prefix="job/part-").get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=listed["Key"])["Body"].read().decode()
        keys = [json.loads(line)["key"] for line in body.splitlines()]
        found[listed["Key"].rsplit("/", 1)[1]] = (listed["ETag"], listed["LastModified"], keys)
    return found


def test_s3_outage_mid_batch_inference_flow_names_s3_and_a_rerun_keeps_the_written_shards(
    prefect_harness: None, tiny_model: Path, s3_server: S3Server, s3_proxy: OutageProxy, tmp_path: Path
) -> None:
    """The batch-inference flow (its job in a child: `vlmops batch-infer`) with its S3 output going away at the second
    of three parts: the run fails naming S3 and its URL, and says to run the flow again (or retry this flow run),
    which keeps the shards written. With S3 back, the retry the message gives, run as a user runs it (in a process of
    its own), answers only the two shards left: every record once across the parts, the first part as the failed try
    wrote it."""
    import shlex

    from prefect.settings import PREFECT_API_URL

    from flows.batch_inference import batch_inference
    from vlmops.outages import ServiceUnavailable

    s3_server.client().create_bucket(Bucket="answers-flow")
    overrides = [f"storage.endpoint_url={s3_proxy.url}", "infer.shard_size=2", "infer.max_new_tokens=2"]
    s3_proxy.fail_at(b"/job/part-00001.jsonl")
    state = batch_inference(
        str(tiny_model), str(_six_prompts(tmp_path)), "s3://answers-flow/job", None, overrides, return_state=True
    )
    assert state.is_failed() and s3_proxy.stops == 1
    flow_run_id = state.state_details.flow_run_id
    entrypoint = re.escape(f"{ROOT / 'flows' / 'batch_inference.py'}:batch_inference")
    advice = (
        r"run the flow again with the same parameters, or retry this flow run: "
        rf"`(prefect flow-run retry {flow_run_id} --entrypoint {entrypoint})` in the folder it started in \(its "
        r"parameters' paths are read from there\); the shards already written are kept and only the rest are answered"
    )
    url = re.escape(s3_proxy.url)
    with pytest.raises(ServiceUnavailable, match=rf"^S3 at {url} did not answer: \w+: [^\n]+\n"):
        state.result()
    with pytest.raises(
        ServiceUnavailable, match=rf"\nstart it \(or fix its URL in the config\), then {advice}$"
    ) as named:
        state.result()
    # The child (`vlmops batch-infer --config` a temporary file, gone by now) named S3 without advice of its own: the
    # flow's log quotes its last lines, and only the flow's advice says what to run.
    assert "did not answer" in str(named.value.__cause__)
    logs = _flow_run_logs(flow_run_id)
    assert any(f"S3 at {s3_proxy.url} did not answer" in message for message in logs), logs
    assert not [message for message in logs if "run the same command again" in message], logs
    before = _parts(s3_server, "answers-flow")
    assert {name: keys for name, (_, _, keys) in before.items()} == {"part-00000.jsonl": ["q0", "q1"]}

    s3_proxy.start()
    given = re.search(advice, str(named.value))
    assert given is not None
    retry = shlex.split(given.group(1))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    retried = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), *retry[1:]], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert retried.returncode == 0, retried.stdout[-3000:] + retried.stderr[-3000:]
    after = _parts(s3_server, "answers-flow")
    assert [key for name in sorted(after) for key in after[name][2]] == [f"q{i}" for i in range(6)]
    assert after["part-00000.jsonl"] == before["part-00000.jsonl"]  # kept, not written again
    manifest = json.loads(s3_server.client().get_object(Bucket="answers-flow", Key="job/manifest.json")["Body"].read())
    assert manifest["results"] == 6 and manifest["rejects"] == 0


def test_s3_outage_in_a_batch_infer_worker_names_s3_and_the_same_command_goes_on(
    tiny_model: Path, s3_server: S3Server, s3_proxy: OutageProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmops batch-infer` with two worker processes, its S3 output going away at the second part (worker 1's): the
    command names S3 and its URL (read off the worker's last lines) and says to run it again, exit 1, not a worker's
    traceback and "1 worker failed". The same command with S3 back answers only what is missing: every record once,
    the parts written before the outage as they were."""
    from vlmops.cli import main

    s3_server.client().create_bucket(Bucket="answers-cli")
    output = "s3://answers-cli/job"
    args = ["batch-infer", "--model", str(tiny_model), "--input", str(_six_prompts(tmp_path)), "--output", output]
    args += ["--set", f"storage.endpoint_url={s3_proxy.url}", "--set", "infer.shard_size=2"]
    args += ["--set", "infer.max_new_tokens=2", "--set", "infer.workers=2"]
    s3_proxy.fail_at(b"/job/part-00001.jsonl")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert re.search(
        rf"\nerror: S3 at {re.escape(s3_proxy.url)} did not answer: \w+: [^\n]+\n"
        r"start it \(or fix its URL in the config\), then run the same command again to answer the rest: the parts "
        rf"written so far are kept \(vlmops batch-status {output} says where it stands\)\n",
        err,
    ), err[-3000:]
    before = _parts(s3_server, "answers-cli")
    assert "part-00001.jsonl" not in before

    s3_proxy.start()
    assert main(args) == 0
    assert ": done\n" in capsys.readouterr().out
    after = _parts(s3_server, "answers-cli")
    assert [key for name in sorted(after) for key in after[name][2]] == [f"q{i}" for i in range(6)]
    assert {name: after[name] for name in before} == before  # kept, not written again


def test_batch_status_with_its_s3_down_names_s3_and_says_to_run_it_again(
    s3_server: S3Server, s3_proxy: OutageProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmops batch-status` of an s3:// output, once with S3 answering (no job there: bad input, exit 2) and once with
    it gone: the command names S3 and its URL and says to start it and run the command again, exit 1; it printed
    botocore's traceback (`vlmops` names the outage for any command, vlmops.cli.main)."""
    from vlmops.cli import main

    s3_server.client().create_bucket(Bucket="answers-status")
    args = ["batch-status", "s3://answers-status/job", "--set", f"storage.endpoint_url={s3_proxy.url}"]
    assert main(args) == 2
    assert "did not answer" not in capsys.readouterr().err
    s3_proxy.stop()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert re.search(
        rf"(?m)^error: S3 at {re.escape(s3_proxy.url)} did not answer: EndpointConnectionError: [^\n]+\n"
        r"start it \(or fix its URL in the config\), then run the command again\n\Z",
        err,
    ), err
    assert "Traceback" not in err


def test_a_command_whose_prefect_api_does_not_answer_names_it_and_its_url(
    prefect_harness: None, tmp_path: Path
) -> None:
    """`vlmops promote` (a command that starts a flow run) with PREFECT_API_URL at a port nothing listens on, then at a
    proxy in front of a real Prefect server that goes down as the flow run is created: each names the Prefect API and
    its URL, says to start it (or point PREFECT_API_URL at it) and run the command again, exit 1. The first was "the
    server" (read off Prefect's "Failed to reach API at URL"), to fix in the config; the second httpx's traceback."""
    from prefect.settings import PREFECT_API_URL

    def promote(api_url: str) -> subprocess.CompletedProcess[str]:
        # Prefect's client retries a cut connection 5 times, 2 to 32 s apart; the command's message is under test.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api_url, "PREFECT_CLIENT_MAX_RETRIES": "0"}
        command = [sys.executable, "-m", "vlmops.cli", "promote", "--set", f"run.output_dir={tmp_path}"]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    proxy = OutageProxy(urlsplit(str(PREFECT_API_URL.value())).port or 0)  # the test harness's server
    try:
        proxy.fail_at(b"POST /api/flow_runs/ ")
        results = {url: promote(url) for url in (nowhere, f"{proxy.url}/api")}
    finally:
        proxy.stop()
    assert proxy.stops == 2  # the outage, then the test's own stop
    for url, result in results.items():
        assert re.search(
            rf"(?m)^error: Prefect API at {re.escape(url)} did not answer: \w+: [^\n]+\n"
            r"start it \(or point PREFECT_API_URL at the server\), then run the command again\n\Z",
            result.stderr,
        ), result.stderr[-3000:]
        assert result.returncode == 1
        assert "Traceback" not in result.stderr


def test_a_registered_model_whose_mlflow_goes_away_mid_download_names_mlflow(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmops infer --model models:/NAME/1` with the MLflow server (behind a proxy) going away once the version is
    found, as its artifacts are being listed for the download: the command names MLflow and its URL and says to start
    it and run the command again, exit 1; it printed MLflow's error on the artifact request."""
    from vlmops.cli import main
    from vlmops.config import TrackingConfig
    from vlmops.tracking import Tracker

    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text("{}")
    tracker = Tracker(TrackingConfig(uri=mlflow_server.url, experiment="faults"))
    tracker.register_model(tracker.start_run("infer"), model, "faults-infer", "challenger")
    proxy = OutageProxy(mlflow_server.port)
    try:
        proxy.fail_at(b"/mlflow-artifacts/")
        args = ["infer", "--model", "models:/faults-infer/1", "--set", f"tracking.uri={proxy.url}"]
        assert main([*args, "--set", f"model.cache_dir={tmp_path / 'cache'}"]) == 1
    finally:
        proxy.stop()
    assert proxy.stops == 2  # the outage, then the test's own stop
    err = capsys.readouterr().err
    assert re.search(
        rf"(?m)^error: MLflow at {re.escape(proxy.url)} did not answer: \w+: [^\n]+\n"
        r"start it \(or fix its URL in the config\), then run the command again\n\Z",
        err,
    ), err
    assert "Traceback" not in err
