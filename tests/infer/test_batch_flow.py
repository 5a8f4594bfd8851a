"""The batch-inference flow against a real Prefect API: the job in a child process group with a progress
artifact, and one job shared by two task-worker processes (distributed=True), exactly once."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tests.prefect_runs import task_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[dict[str, str]]:
    """The session's temporary Prefect server (the test harness); the settings a worker process needs to reach it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_LOCAL_STORAGE_PATH": str(storage)}


def _artifacts(model: Path | str, output: Path, kind: str = "progress") -> list[Any]:
    """The `kind` artifacts of the batch jobs from `model` into `output` (the flow's description names both), newest
    first."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> list[Any]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=[kind])), sort=ArtifactSort.CREATED_DESC
            )
            return [a for a in found if a.description == f"batch inference {model} -> {output}"]

    return asyncio.run(read())


def test_flow_runs_the_job_in_a_child_and_reports_progress(
    prefect_api: dict[str, str], tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    from flows.batch_inference import batch_inference

    _, eval_file = demo_data
    out = tmp_path / "out"
    overrides = ["infer.max_new_tokens=3", "infer.shard_size=2"]
    # A trial run (infer.max_shards): the first shard, then the flow reports where the job stands.
    trial = batch_inference(str(tiny_model), str(eval_file), str(out), None, [*overrides, "infer.max_shards=1"])
    assert trial["state"] == "stopped" and trial["shards_done"] == 1 and trial["shards"] == 3, trial
    assert trial["pending_shards"] == ["00001", "00002"] and not (out / "manifest.json").exists()
    (stopped,) = (a.data for a in _artifacts(tiny_model, out, "markdown"))
    assert stopped.startswith(f"# batch inference job {trial['job_id']}: stopped by infer.max_shards\n"), stopped
    assert "| done | 1 of 3 shards: 2 records, 2 answered, 0 rejected |" in stopped
    assert "| to do | 2 shards: 4 records |" in stopped
    summary = batch_inference(str(tiny_model), str(eval_file), str(out), None, overrides)
    assert summary["records"] == summary["results"] == 6 and summary["rejects"] == 0
    assert summary["output"] == str(out) and (out / "manifest.json").is_file()
    assert len(list(out.glob("part-*.jsonl"))) == 3
    assert any(a.data == 100.0 for a in _artifacts(tiny_model, out))
    again = batch_inference(str(tiny_model), str(eval_file), str(out), None, overrides)  # done: nothing to redo
    assert summary["shards_run"] == 2 and summary["job_id"] == trial["job_id"]  # the trial's shard not redone
    assert again["job_id"] == summary["job_id"] and again["shards_run"] == 0
    # A summary artifact per flow run: the rows the command prints, with this run's shards.
    second, first, _ = (a.data for a in _artifacts(tiny_model, out, "markdown"))
    assert first.startswith(f"# batch inference job {summary['job_id']}\n"), first
    assert "| records | 6 read: 6 answered, 0 rejected |" in first
    assert f"| exact match | {summary['exact_match'] * 6:.0f} of 6 answers equal to the record's reference" in first
    assert "| answers | greedy |" in first and f"| output | {out}/part-*.jsonl (3 parts), manifest.json |" in first
    assert re.search(r"\| this run \| 2 shards in \d+\.\d s \|", first), first
    assert re.search(r"\| this run \| 0 shards in \d+\.\d s \|", second), second
    # And a table of the first results beside their questions (a table artifact's data is its rows as JSON).
    table = json.loads(_artifacts(tiny_model, out, "table")[0].data)
    assert [row["key"] for row in table] == [f"eval.jsonl:{i}" for i in range(1, 7)]
    reference = json.loads(eval_file.read_text().splitlines()[0])["conversations"][-1]["value"]
    assert table[0]["question"] == "What colour is the shape?" and table[0]["reference"] == reference


def _registered_copy(model: Path, folder: Path, max_new_tokens: int) -> Path:
    """A copy of `model` as the retrain flow registers one: merged weights with the config they were made with (here:
    its `infer.max_new_tokens`)."""
    from vlmops.config import dump_config, load_config
    from vlmops.train.rundir import CONFIG_FILE, RunInfo

    shutil.copytree(model, folder)
    (folder / CONFIG_FILE).write_text(dump_config(load_config(None, [f"infer.max_new_tokens={max_new_tokens}"])))
    RunInfo(str(model), str(folder.parent), "test", "full", merged_from=str(folder.parent / "final")).write(folder)
    return folder


def test_a_promotion_while_the_flow_starts_its_job_puts_no_other_version_in_it(
    prefect_api: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    """`batch_inference(model="models:/NAME@champion")` takes the version's saved settings in the flow and starts the
    job in a child; the alias moves (`vlmops promote`) while the flow waits for its `gpu` slot. The child looked the
    alias up again: the job ran version 2's weights with version 1's settings and recorded version 2. Now the flow
    looks the alias up once and hands the child that version: the job is version 1 throughout, recorded as the alias
    the user named and the version it resolved to, in the manifest, the results and the summary artifact."""
    import threading

    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

    from flows.batch_inference import batch_inference
    from tasks.gpu import GPU_LIMIT
    from tests.infer.test_registry_load import register
    from vlmops.infer.planning import folder_hash
    from vlmops.models.tiny import build_tiny_model

    registry = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=registry).create_experiment("registry", (tmp_path / "artifacts").as_uri())
    name, alias = "vlmops-flow", "models:/vlmops-flow@champion"
    first = _registered_copy(tiny_model, tmp_path / "v1" / "merged", max_new_tokens=3)
    second = _registered_copy(build_tiny_model(tmp_path / "other", "deepseek_vl", seed=5), tmp_path / "v2" / "m", 5)
    assert register(registry, first, "champion", name) == "1"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "query": f"Say {i}."}) + "\n" for i in range(3)))
    out, cache = tmp_path / "out", tmp_path / "cache"

    held, failed = threading.Event(), []

    def promote_while_the_flow_waits() -> None:
        """Hold the one `gpu` slot until the flow has fetched version 1, then move the alias and let the flow go on."""
        try:
            with concurrency(GPU_LIMIT, occupy=1, strict=True):
                held.set()
                deadline = time.monotonic() + 300
                while not list(cache.glob(f"registry/*/{name}/v1/vlmops_registry.json")):
                    assert time.monotonic() < deadline, "the flow did not fetch version 1"
                    time.sleep(0.2)
                assert register(registry, second, "champion", name) == "2"
        except BaseException as err:
            failed.append(err)
            held.set()

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
    promoter = threading.Thread(target=promote_while_the_flow_waits)
    try:
        promoter.start()
        assert held.wait(120) and not failed, failed
        overrides = [f"tracking.uri={registry}", f"model.cache_dir={cache}", "infer.shard_size=2"]
        summary = batch_inference(alias, str(prompts), str(out), None, overrides)
    finally:
        promoter.join(300)
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # back to the default: mlflow unsets it on None
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    assert not failed, failed
    assert summary["records"] == summary["results"] == 3

    manifest = json.loads((out / "manifest.json").read_text())
    v1 = {"uri": alias, "version": "1", "content_hash": f"sha256:{folder_hash(first)}"}
    assert (manifest["model"], manifest["settings"]["max_new_tokens"]) == (v1, 3)  # version 1's settings and weights
    results = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert [r["model"] for r in results] == [v1] * 3
    (markdown,) = (a.data for a in _artifacts(alias, out, "markdown"))
    assert f"| model | {alias} (version 1, {v1['content_hash'][:19]}) |" in markdown, markdown


def test_two_task_workers_share_one_job_exactly_once(
    prefect_api: dict[str, str], tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    from flows.batch_inference import batch_inference

    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(images["red"], tmp_path / "red.png")  # beside the input: inside its root
    prompts.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "query": f"<img>red.png</img>Colour {i}?" if i % 2 else f"Say {i}"}) + "\n"
            for i in range(24)
        )
    )
    out = tmp_path / "out"
    with task_workers(2, {**os.environ, **prefect_api}, tmp_path):
        overrides = ["infer.max_new_tokens=3", "infer.shard_size=3", "infer.batch_size=3"]
        trial = batch_inference(  # a trial run of two shards first: the job then goes on from there
            str(tiny_model), str(prompts), str(out), None, [*overrides, "infer.max_shards=2"], distributed=True
        )
        summary = batch_inference(str(tiny_model), str(prompts), str(out), None, overrides, distributed=True)

    assert trial["state"] == "stopped" and trial["shards_done"] == 2 and len(trial["pending_shards"]) == 6, trial
    assert summary["records"] == summary["results"] == 24 and summary["shards_run"] == 6
    assert len(summary["workers"]) == 2, summary["workers"]  # both worker processes answered shards
    keys = [
        json.loads(line)["key"] for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()
    ]
    assert keys == [f"r{i}" for i in range(24)]  # every input exactly once, in input order
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["records"] for p in manifest["parts"]] == [3] * 8
    assert any(a.data == 100.0 for a in _artifacts(tiny_model, out))
    markdown, stopped = (a.data for a in _artifacts(tiny_model, out, "markdown"))
    assert "| done | 2 of 8 shards: 6 records, 6 answered, 0 rejected |" in stopped, stopped
    assert re.search(r"\| this run \| 6 shards on 2 workers in \d+\.\d s: [\d.]+ tokens/s", markdown), markdown
    assert "exact match" not in markdown  # simple records have no reference answer


def test_a_flow_run_of_a_job_another_run_holds_fails_naming_it(
    prefect_api: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    """A scheduled run that starts while the last one still runs (or one beside a `vlmops batch-infer` of the job)
    fails at once with the message the CLI gives, in either mode: before, it answered the shards beside the other."""
    from flows.batch_inference import batch_inference
    from tests.infer.test_job_lock import first_run, refused_naming
    from vlmops.infer.job_lock import JobRunningError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "query": f"Say {i}."}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    with first_run(str(out)) as holder:
        for distributed in (False, True):
            with pytest.raises(JobRunningError) as refused:
                batch_inference(str(tiny_model), str(prompts), str(out), None, [], distributed=distributed)
            refused_naming(holder, str(refused.value))
    assert sorted(p.name for p in out.iterdir()) == ["_job"]  # nothing planned or answered


def test_a_shard_task_retried_after_its_part_was_published_answers_nothing_twice_in_the_same_output(
    prefect_api: dict[str, str], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect retries `answer_shard` (its `retries`) whose worker lost its connection after the shard's part was
    published: the retry writes into the same output, finds the shard done and answers nothing. The job stays one
    folder, every record in it once, the part as the first try wrote it."""
    from prefect import flow

    import tasks.infer
    from tasks.infer import answer_shard
    from vlmops.config import load_config
    from vlmops.infer.batch_job import complete_job, prepare_job, run_job_shard
    from vlmops.infer.job_status import JobResult, ShardStats

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "query": f"Say {i}."}) + "\n" for i in range(6)))
    out = tmp_path / "out"
    tries: list[tuple[int, int]] = []  # (shard, records it answered) of each try
    published: dict[str, int] = {}

    def shard_reported_lost(model: str, output: str, config: Any, shard: int) -> ShardStats:
        stats = run_job_shard(model, output, config, shard)
        tries.append((shard, stats.results))
        if tries.count((1, 2)) == 1 and tries[-1] == (1, 2):
            published["part"] = (out / "part-00001.jsonl").stat().st_mtime_ns
            raise ConnectionError("the worker lost the Prefect API before it reported the shard")
        return stats

    monkeypatch.setattr(tasks.infer, "run_job_shard", shard_reported_lost)

    @flow
    def job() -> JobResult:
        config = load_config(None, ["infer.max_new_tokens=3", "infer.shard_size=2"])
        _, plan, output, config = prepare_job(str(tiny_model), str(prompts), str(out), config)
        ran = []
        for shard in plan.shards:
            stats = answer_shard(str(tiny_model), output.uri, config, shard.index)
            assert isinstance(stats, ShardStats)  # a State only for a shard whose flow run was stopped
            ran.append(stats)
        return complete_job(plan, output, ran, config)

    result = job()
    assert tries == [(0, 2), (1, 2), (1, 0), (2, 2)]  # shard 1's retry found its part: nothing answered again
    assert result.records == result.results == 6 and result.output == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "prompts.jsonl"]  # one output folder
    assert (out / "part-00001.jsonl").stat().st_mtime_ns == published["part"]
    keys = [
        json.loads(line)["key"] for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()
    ]
    assert keys == [f"r{i}" for i in range(6)]


def test_a_progress_poll_that_cannot_reach_the_output_does_not_stop_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The progress artifact is a view of the job: a poll that cannot read the output (S3 down for a moment) is logged
    and the job goes on. It raised, and `run_in_process_group` stops the job's whole process group on a poll that
    raises: an outage of seconds killed a GPU job, the prompts in flight with it."""
    import uuid

    from flows.batch_inference import _progress_poller
    from infra.local.seaweedfs import free_ports
    from vlmops.config import load_config
    from vlmops.infer.parallel import run_in_process_group

    (port,) = free_ports(1)  # nothing listens there
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    poll = _progress_poller("s3://jobs/out", load_config(None), uuid.uuid4())
    # The job ends on its own and is polled at least once: it raised EndpointConnectionError, the job stopped.
    run_in_process_group([sys.executable, "-c", "pass"], poll=poll)


def test_cancelling_a_stopped_jobs_shards_as_the_api_goes_away_ends_at_once_and_says_why(
    prefect_api: dict[str, str],
) -> None:
    """A distributed flow run stops (a cancel, Ctrl-C, its own failure) as the Prefect API goes away: the first call
    that cancels a shard's task run is cut, and the API's address refuses the rest. The cancel gives up at once and
    says why, raising nothing over the stop: with the client's own retries (5, backing off 2 s to 32 s) a Ctrl-C
    would wait a minute for it, and a cancelled flow run would be SIGKILLed before its line was logged."""
    from urllib.parse import urlsplit
    from uuid import uuid4

    from prefect import task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.batch_inference import _cancel_not_started
    from tests.outage_proxy import OutageProxy
    from vlmops.infer.shards import Shard

    @task
    def queued() -> None:
        """A background task no task worker serves: its runs stay Scheduled."""

    runs = [queued.delay().task_run_id for _ in range(3)]
    shards = {run: Shard(i, 0, 2 * i, 2, 0, 2 * i + 1) for i, run in enumerate([*runs, uuid4()])}
    proxy = OutageProxy(int(urlsplit(prefect_api["PREFECT_API_URL"]).port or 0))
    proxy.fail_at(b"/set_state")
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: f"{proxy.url}/api"}):
        cancelled, running, failed = _cancel_not_started(shards, "interrupted")
    assert time.monotonic() - started < 5
    assert (cancelled, running, proxy.stops) == ([], [], 1), failed
    assert failed is not None and failed.startswith(("RemoteProtocolError", "ReadError")), failed


def test_a_distributed_run_no_task_worker_takes_says_so_and_fails_when_a_shards_task_run_is_gone(
    prefect_api: dict[str, str], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distributed flow run whose shards no task worker takes sat in Running, its log silent after "3 shards to hand
    to the task workers"; a shard whose task worker died stayed Running unseen; a shard's task run that a task worker
    deleted (it could not read its parameters) left the flow waiting forever. Now, with no task worker running: a
    warning that says how many shards wait, for how long, that the API sees no task worker, and the command that starts
    one; then, shard 0 Running (a task worker that started it and died, as the API shows it), a line naming it and for
    how long; then shard 2's task run deleted: the flow run fails naming it, after cancelling shard 1."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Running

    import flows.batch_inference
    from flows.batch_inference import batch_inference
    from tests.prefect_runs import flow_run_logs, flow_run_state, task_runs

    for name, seconds in {"POLL_S": 0.1, "WAITING_REPORT_S": 1.0, "WAITING_REPORT_EVERY_S": 1.0}.items():
        monkeypatch.setattr(flows.batch_inference, name, seconds)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "query": f"Say {i}."}) + "\n" for i in range(6)))
    found: dict[str, Any] = {}

    def a_worker_that_dies_then_one_that_deletes() -> None:
        """As the flow waits: shard 0 Running, as a task worker that died left it; then shard 2's task run deleted."""
        try:
            deadline = time.monotonic() + 120
            with get_client(sync_client=True) as client:
                while not found.get("shards"):
                    assert time.monotonic() < deadline, "the flow run did not hand out its shards"
                    for run in client.read_flow_runs(
                        flow_filter=FlowFilter(name=FlowFilterName(any_=["batch-inference"])),
                        flow_run_filter=FlowRunFilter(
                            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
                        ),
                    ):
                        if len(shards := task_runs(run.id).get("answer_shard", [])) == 3:
                            found.update(flow_run=run.id, shards=[UUID(id_) for _, id_ in shards])
                    time.sleep(0.2)
                time.sleep(2.0)  # the warning: no shard taken for 1 s
                client.set_task_run_state(found["shards"][0], Running(), force=True)
                time.sleep(2.0)  # the line naming shard 0, running for 1 s
                client.delete_task_run(found["shards"][2])
        except BaseException as err:
            found["error"] = err

    meddler = threading.Thread(target=a_worker_that_dies_then_one_that_deletes)
    meddler.start()
    try:
        with pytest.raises(RuntimeError, match=r"the task run of shard 00002 is gone from the Prefect API"):
            overrides = ["infer.max_new_tokens=3", "infer.shard_size=2"]
            batch_inference(str(tiny_model), str(prompts), str(tmp_path / "out"), None, overrides, distributed=True)
    finally:
        meddler.join(120)
    assert "error" not in found, found["error"]

    state, message = flow_run_state(found["flow_run"])
    assert state == "Failed" and "shard 00002 is gone" in str(message), (state, message)
    deadline = time.monotonic() + 30
    logs = flow_run_logs(found["flow_run"])
    while not any(" stopped (" in line for line in logs):  # the flow run's last lines reach the API a moment later
        assert time.monotonic() < deadline, logs
        time.sleep(0.5)
        logs = flow_run_logs(found["flow_run"])
    waiting = [line for line in logs if "3 shards waiting" in line]
    assert waiting and "no shard taken or finished for 1 s" in waiting[0], logs
    assert "the Prefect API sees 0 task workers serving answer_shard" in waiting[0], waiting[0]
    assert waiting[0].endswith(": python -m flows.batch_inference serve"), waiting[0]
    assert any(
        re.search(r"2 shards waiting, 1 shard on task workers \(00000 running for \d s\)", line) for line in logs
    )
    (stopped,) = [line for line in logs if " stopped (" in line]
    assert "1 shard cancelled before a task worker started them" in stopped, stopped
    assert "still running on task workers: 1 shard (00000)" in stopped, stopped
    assert [s for s, _ in task_runs(found["flow_run"])["answer_shard"]] == ["Running", "Cancelled"]
