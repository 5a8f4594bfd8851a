"""A flow run on a Prefect worker is as quiet as `vlmops run`, and as verbose as VLMOPS_VERBOSE set on the worker asks;
vlmops's own INFO lines show there and in the flow run's log on the server, as under `vlmops run`.

A real process worker (`prefect worker start --type process --run-once`) against the session's Prefect server (the
test harness) runs prefect.yaml's batch-inference deployment (its entrypoint and pull step) on the tiny model, with
the output in S3 (SeaweedFS). The flow's own process makes an S3 client there, so botocore logs "Found credentials in
environment variables." at INFO, and Prefect's client logs a line per API call through httpx. The job's child
(`vlmops batch-infer`) followed VLMOPS_VERBOSE before; its lines have vlmops's format, while the flow run's process
writes through Prefect's console handler (`| INFO    | botocore.credentials - ...`): that is how the checks below tell
the flow run's process apart. Given the model as the catalog's tiny entry with its folder as `model.id`, the flow run's
process fetches it (a local folder: it writes the folder's manifest, an INFO line of vlmops's) before the child loads it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from uuid import UUID

import pytest

from tests.prefect_runs import deployment_run, flow_run_logs, flow_run_state, worker_command
from tests.s3_server import S3Server

BUCKET = "quiet-worker"

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(600)]

# Lines of the flow run's own process (Prefect's console format), not of the job's child.
CREDENTIALS = "| INFO    | botocore.credentials - Found credentials in environment variables."
PER_REQUEST = "| INFO    | httpx - HTTP Request: "
NO_GPU_LIMIT = "Concurrency limits ['gpu'] do not exist"
OWN_LINE = "| INFO    | vlmops.models.manifest - wrote manifest "  # vlmops's line, in the flow run's process
CHILD_STARTED = "(model resolved, hashed and loaded; engine built)"  # vlmops.infer.batch_job's, in the job's child
SOON = "VLMOPS_RETRY_DELAY_S='soon': must be a number of seconds, 0 or more (unset: the defaults)"
LOUD = (
    "VLMOPS_VERBOSE='loud' in the environment is not a verbosity: set it to 0 (quiet), 1 (as --verbose) or 2 (as -vv), "
    "or unset it"
)
# Where the flow run's life begins and ends in what the worker prints (Prefect's engine's lines).
BEGINS, ENDS = "Beginning flow run", "Finished in state"


def _on_a_worker(
    name: str, worker_env: dict[str, str], s3: S3Server, model: str, tmp_path: Path, overrides: tuple[str, ...] = ()
) -> tuple[str, UUID]:
    """The batch-inference deployment of one prompt with `model` (and `overrides`), run by a process worker with
    `worker_env` on top of the team's client settings: (what the worker printed, its flow run's id)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "q0", "query": "What colour?"}) + "\n")
    settings = [f"run.output_dir={tmp_path / 'outputs'}", f"model.cache_dir={tmp_path / 'cache'}"]
    settings += [f"storage.endpoint_url={s3.endpoint_url}", "infer.max_new_tokens=1", *overrides]
    parameters = {"model": model, "input": str(prompts), "output": f"s3://{BUCKET}/{name}", "overrides": settings}
    pool = f"quiet-{name}"
    flow_run_id = deployment_run(pool, parameters)
    worker, env = worker_command(pool, {**s3.env(), **worker_env}, tmp_path)
    done = subprocess.run(worker, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr, flow_run_id


@pytest.fixture
def bucket(s3_server: S3Server) -> S3Server:
    client = s3_server.client()
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return s3_server


def test_a_worker_s_flow_run_hides_the_noise_vlmops_run_hides(
    prefect_harness: None, bucket: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    """A team that lets the INFO lines through on its workers (PREFECT_LOGGING_ROOT_LEVEL=INFO: at Prefect's default,
    WARNING, the flow run's process shows no library's INFO line, and none of vlmops's either) saw botocore's line for
    each S3 client and httpx's line for each of the hundreds of Prefect API calls; the defaults of `vlmops run` hide
    them. A missing `gpu` limit still shows: on a server it is a set-up mistake (quiet.EMBEDDED_ONLY_NOISE). Prefect's
    own handlers work as before: the flow run's lines reach the server, and vlmops's own INFO lines with them (before,
    only the worker's output showed those; at Prefect's default root level, not even that: test_quiet's
    test_a_flow_runs_process_is_set_up_as_vlmops_sets_itself_up)."""
    model = ("model.source=local", f"model.id={tiny_model}")
    env = {"PREFECT_LOGGING_ROOT_LEVEL": "INFO"}
    output, flow_run_id = _on_a_worker("quiet", env, bucket, "tiny-deepseek-vl", tmp_path, model)
    assert flow_run_state(flow_run_id)[0] == "Completed", output[-5000:]
    # The worker's own process and the flow run's before it loads the flow (the pull step) are Prefect's, not vlmops's:
    # from the flow's start to its end, the lines are the flow run's.
    flow_run = output[output.index(BEGINS) : output.index(ENDS)]
    assert CREDENTIALS not in flow_run and PER_REQUEST not in flow_run, flow_run
    assert NO_GPU_LIMIT in flow_run, flow_run
    assert flow_run.count(OWN_LINE) == 1, flow_run
    logs = flow_run_logs(flow_run_id)
    assert any("1 record, 1 answered, 0 rejected" in line for line in logs), logs
    assert len([line for line in logs if line.startswith("wrote manifest ")]) == 1, logs
    # The job's child's lines too (before, the worker's output alone showed them), once each.
    assert len([line for line in logs if line.endswith(CHILD_STARTED)]) == 1, logs


def test_vlmops_verbose_on_the_worker_shows_the_noise_in_its_flow_runs(
    prefect_harness: None, bucket: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    """VLMOPS_VERBOSE=1 on a worker is `vlmops --verbose` for its flow runs, at Prefect's default root level too:
    botocore's INFO line shows in the flow run's process (before, only the job's child showed it), the per-request
    lines do not (those are for -vv)."""
    output, flow_run_id = _on_a_worker("verbose", {"VLMOPS_VERBOSE": "1"}, bucket, str(tiny_model), tmp_path)
    assert flow_run_state(flow_run_id)[0] == "Completed", output[-5000:]
    assert CREDENTIALS in output and PER_REQUEST not in output, output[-5000:]


def test_a_vlmops_verbose_that_is_no_level_stops_the_flow_run_with_one_message(
    prefect_harness: None, bucket: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    """VLMOPS_VERBOSE=loud (and VLMOPS_RETRY_DELAY_S=soon, read by the tasks' import) on a worker: the flow run stops
    before any step and ends Failed. Its state's message names each variable, its value and the values that work; what
    the worker prints and the flow run's log (the UI's) show it once, in Prefect's "Finished in state Failed(...)", with
    no traceback, nor Prefect's note that it still sends events at the exit. Before, the flow's import failed: Prefect
    printed its traceback three times (the flow run, its engine, the process that runs the on_crashed hooks), the
    message last in each. Then the flow run's process ended itself (os._exit):
    the worker reported the run Crashed, and Prefect's heartbeat thread could outlive the events sender the exit
    flushed and log its own traceback ("Cannot put items in a stopped service instance")."""
    bad = {"VLMOPS_VERBOSE": "loud", "VLMOPS_RETRY_DELAY_S": "soon"}
    output, flow_run_id = _on_a_worker("loud", bad, bucket, str(tiny_model), tmp_path)
    state, message = flow_run_state(flow_run_id)
    assert state == "Failed" and message and LOUD in message and SOON in message, (state, message, output[-5000:])
    assert output.count(LOUD) == 1 and output.count(SOON) == 1, output[-5000:]
    assert "Traceback" not in output and "Still processing items" not in output, output[-5000:]
    assert "batch inference job" not in output, output[-5000:]  # the job's child never started
    logs = flow_run_logs(flow_run_id)
    named = [line for line in logs if LOUD in line or SOON in line]
    assert len(named) == 1 and LOUD in named[0] and SOON in named[0], logs  # the UI's: one line names both
    assert not any("Traceback" in line for line in logs), logs
