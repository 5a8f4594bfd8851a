"""The retry classifier over real exception objects, and through Prefect's own retry machinery."""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable

import botocore.exceptions
import filelock
import httpx
import pytest
import requests
import urllib3.exceptions
from mlflow.exceptions import MlflowException, RestException
from urllib3.connectionpool import HTTPConnectionPool

from vlmops.errors import UserInputError
from vlmops.models.download_errors import TransferFailedError
from vlmops.outages import Outage, is_transient, unreachable_service
from vlmops.staging import LockTimeoutError
from vlmops.storage import CorruptedDownloadError


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


def raised_from(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        raise exc from cause
    except BaseException as err:
        return err


POOL = HTTPConnectionPool("mlflow.internal", 5000)

TRANSIENT = [
    requests.ConnectionError("connection reset"),
    requests.Timeout("read timed out"),
    http_error(502),
    http_error(503),
    http_error(429),
    urllib3.exceptions.ProtocolError("connection aborted"),
    urllib3.exceptions.ReadTimeoutError(POOL, "/api", "read timed out"),
    urllib3.exceptions.MaxRetryError(POOL, "/api", urllib3.exceptions.ResponseError("too many 503 responses")),
    botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3.internal:8333"),
    botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3.internal:8333"),
    botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3.internal:8333"),
    client_error("SlowDown", 503),
    client_error("Throttling", 400),
    client_error("InternalError", 500),
    RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "try later"}),
    RestException({"error_code": "INTERNAL_ERROR", "message": "database is locked"}),
    ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    TimeoutError("timed out"),
    raised_from(RuntimeError("download broke off"), requests.ConnectionError("reset")),
    CorruptedDownloadError("s3://b/k arrived corrupted (MD5 differs from its ETag); run again"),
    raised_from(
        TransferFailedError("s3://b/k arrived corrupted"), CorruptedDownloadError("s3://b/k arrived corrupted")
    ),
]
PERMANENT = [
    http_error(404),  # an unknown model id on the hub
    http_error(401),
    http_error(400),
    client_error("NoSuchKey", 404),
    client_error("AccessDenied", 403),
    RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such model"}),
    RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}),
    MlflowException("an artifact path that is not a folder"),
    ValueError("s3://b/a/../k: its key has an empty, '.' or '..' part, so it names no file inside /cache"),
    FileNotFoundError(errno.ENOENT, "no such snapshot"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    raised_from(OSError(errno.ENOSPC, "No space left on device"), requests.ConnectionError("reset")),
    raised_from(UserInputError("model 'deepseek-vl-9b' is not in the catalog"), http_error(503)),
    # another process held the model's download lock for the whole wait: a retry would wait as long again
    raised_from(LockTimeoutError("/cache/.m.json.lock is still locked after 3600 s"), filelock.Timeout("/c/.m.lock")),
    RuntimeError("parity check failed"),
    KeyError("config"),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_permanent_failures_are_not_retried(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_the_prefect_condition_reads_the_exception_off_the_failed_state() -> None:
    from prefect.states import Failed

    from tasks.retry import transient

    # What Prefect's task engine hands `retry_condition_fn` after a task raised (prefect/task_engine.py).
    assert transient(None, None, Failed(data=http_error(503), message="Task run encountered an exception"))
    assert not transient(None, None, Failed(data=ValueError("corrupt snapshot"), message="..."))


def test_a_gpu_shard_is_retried_unless_its_input_or_the_disk_failed() -> None:
    """answer_shard retries what another try (another worker) could pass, not a bad record under on_error: fail,
    which would answer the shard up to it again, each time."""
    import errno

    from prefect.states import Failed

    from tasks.infer import answer_shard
    from tasks.retry import another_try_could_pass
    from vlmops.infer.job import RecordRejectedError

    def retried(exc: BaseException) -> bool:
        return another_try_could_pass(None, None, Failed(data=exc, message="Task run encountered an exception"))

    assert answer_shard.retry_condition_fn is another_try_could_pass
    assert retried(RuntimeError("CUDA error: unspecified launch failure"))
    assert retried(http_error(503))
    assert not retried(RecordRejectedError("in.jsonl:7: images/gone.png: file not found"))
    assert not retried(OSError(errno.ENOSPC, "No space left on device"))


def test_a_failure_that_carries_a_named_outage_is_not_named_again() -> None:
    """retrain's auto_promote failing on an MLflow outage: promote named it (ServiceUnavailable), and retrain's own
    failure raised from it (PromotionFailed, with the run's summary) reaches the user as it is, not renamed."""
    from tasks.retry import names_unreachable_service
    from vlmops.errors import RunFailed
    from vlmops.outages import Outage, ServiceUnavailable

    refused = requests.ConnectionError("refused")
    outage = raised_from(
        ServiceUnavailable(Outage("MLflow", "http://127.0.0.1:9", "ConnectionError: refused"), "retry this flow run"),
        refused,
    )

    @names_unreachable_service(lambda: "run again")
    def flow_body() -> None:
        raise RunFailed("version 1 was trained and registered, but its promotion failed") from outage

    with pytest.raises(RunFailed, match="promotion failed") as raised:
        flow_body()
    assert not isinstance(raised.value, ServiceUnavailable) and raised.value.__cause__ is outage


def test_retry_delays_are_the_tasks_own_unless_the_environment_sets_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """VLMOPS_RETRY_DELAY_S replaces every wait (the suite sets it to 1: its outages are staged); unset, each task's
    own; a value that is no number of seconds is an error naming the variable (retry_delay_setting, which every entry
    point checks first: test_quiet), while the tasks' import keeps their own waits (no traceback of a failed import)."""
    from tasks.retry import retry_delays
    from vlmops.outages import RETRY_DELAY_ENV, retry_delay_setting

    monkeypatch.delenv(RETRY_DELAY_ENV, raising=False)
    assert retry_delays(5, 10) == [5, 10] and retry_delay_setting() is None
    monkeypatch.setenv(RETRY_DELAY_ENV, "0.5")
    assert retry_delays(5, 10) == [0.5, 0.5]
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(RETRY_DELAY_ENV, bad)
        with pytest.raises(ValueError, match=rf"^{RETRY_DELAY_ENV}='{bad}': must be a number of seconds"):
            retry_delay_setting()
        assert retry_delays(5, 10) == [5, 10]


def test_an_outage_a_child_process_reported_is_named_again_by_its_parent_with_the_parents_advice() -> None:
    """A batch job's child (the `vlmops batch-infer` the flow runs, a worker process of the job) names the server it
    could not reach in its last lines; its parent's error quotes them, and the flow (or the command) names the outage
    again with its own advice, the child's error kept. An error that quotes no outage is none."""
    import sys

    from tasks.retry import names_unreachable_service
    from vlmops.errors import RunFailed
    from vlmops.infer.parallel import run_in_process_group
    from vlmops.outages import Outage, ServiceUnavailable, unreachable_service

    refused = 'EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:9/b/part-00001.jsonl"'
    child = (
        "from vlmops.outages import Outage, ServiceUnavailable\n"
        f"raise ServiceUnavailable(Outage('S3', 'http://127.0.0.1:9', {refused!r}), 'run the same command again')"
    )

    @names_unreachable_service(lambda: "run the flow again")
    def flow_body(code: str) -> None:
        run_in_process_group([sys.executable, "-c", code])

    with pytest.raises(ServiceUnavailable) as named:
        flow_body(child)
    assert str(named.value) == (
        f"S3 at http://127.0.0.1:9 did not answer: {refused}\n"
        "start it (or fix its URL in the config), then run the flow again"
    )
    assert isinstance(named.value.__cause__, RunFailed) and "run the same command again" in str(named.value.__cause__)
    with pytest.raises(RunFailed) as failed:
        flow_body("raise SystemExit('error: the model folder is empty')")
    assert not isinstance(failed.value, ServiceUnavailable) and unreachable_service(failed.value) is None
    assert unreachable_service(RunFailed(f"worker failed; its last lines:\n  error: {named.value}")) == Outage(
        "S3", "http://127.0.0.1:9", refused
    )


def _closed_port_url() -> str:
    """`http://127.0.0.1:PORT` where nothing listens: a port the system handed out and took back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _failed(call: Callable[[], object]) -> Exception:
    try:
        call()
    except Exception as err:
        return err
    raise AssertionError(f"{call} passed")


def test_a_prefect_api_that_does_not_answer_is_transient_and_named_with_its_url() -> None:
    """Prefect's own client at a port nothing listens on: transient, and the outage names the Prefect API at its URL
    (what PREFECT_API_URL says) with httpx's error, also where Prefect raised a RuntimeError from it that repeats only
    the URL (its version check before a flow run). A plain request to the API's paths (Prefect's version check uses a
    client of its own) names it too; one elsewhere names the server."""
    from prefect.client.orchestration import SyncPrefectClient

    from vlmops.outages import PREFECT_API

    api = f"{_closed_port_url()}/api"
    with SyncPrefectClient(api) as client:
        refused = _failed(client.read_flow_runs)
    assert isinstance(refused, httpx.ConnectError) and is_transient(refused)
    outage = unreachable_service(refused)
    assert outage is not None and (outage.service, outage.url) == (PREFECT_API, api)
    assert outage.error.startswith("ConnectError: ") and "refused" in outage.error
    wrapped = raised_from(RuntimeError(f"Failed to reach API at {api}/"), refused)
    assert is_transient(wrapped) and unreachable_service(wrapped) == outage

    plain = _failed(lambda: httpx.get(f"{api}/admin/version"))
    assert unreachable_service(plain) == Outage(PREFECT_API, api, outage.error)
    elsewhere = _failed(lambda: httpx.get(f"{api.removesuffix('/api')}/models/1"))
    assert unreachable_service(elsewhere) == Outage("the server", api.removesuffix("/api"), outage.error)

    with_login = api.replace("http://", "http://alice:s3cretpassw0rd@")
    with SyncPrefectClient(with_login) as client:
        named = unreachable_service(_failed(client.read_flow_runs))
    assert named is not None and named.url == api.replace("http://", "http://alice:***@")


def test_httpx_errors_of_a_server_that_went_away_are_transient_and_its_answers_are_not() -> None:
    """Real httpx errors: a connection cut before the answer (a proxy that goes down as the request arrives), a read
    that timed out, a 503 (also as Prefect's PrefectHTTPStatusError) are transient; a 404 and a URL httpx cannot ask
    (no http) are the same on every try."""
    from prefect.exceptions import PrefectHTTPStatusError

    from tests.image_server import serving_images
    from tests.outage_proxy import OutageProxy

    with serving_images() as server:
        proxy = OutageProxy(server.server_address[1])
        try:
            proxy.fail_at(b"/ok.png")
            cut = _failed(lambda: httpx.get(f"{proxy.url}/ok.png"))
        finally:
            proxy.stop()
        timed_out = _failed(lambda: httpx.get(f"{server.url}/slow.png", timeout=0.2))
        server.down = True
        unavailable = _failed(lambda: httpx.get(f"{server.url}/flaky.png").raise_for_status())
        missing = _failed(lambda: httpx.get(f"{server.url}/missing.png").raise_for_status())
    assert isinstance(cut, (httpx.RemoteProtocolError, httpx.ReadError)), repr(cut)
    assert isinstance(timed_out, httpx.ReadTimeout) and isinstance(unavailable, httpx.HTTPStatusError)
    for transient in (cut, timed_out, unavailable, PrefectHTTPStatusError.from_httpx_error(unavailable)):
        assert is_transient(transient), repr(transient)
        assert unreachable_service(transient) is not None
    for permanent in (missing, _failed(lambda: httpx.get("ftp://127.0.0.1/x"))):
        assert not is_transient(permanent) and unreachable_service(permanent) is None, repr(permanent)


def test_an_outage_the_core_named_is_named_again_with_the_advice_of_the_flow_or_the_command() -> None:
    """A DVC remote the core named without advice (vlmops.versioning, from the S3 client's error): the flow's error
    and a command's name it again, with what they say to run and where the remote's URL is set."""
    import argparse

    from tasks.retry import names_unreachable_service
    from vlmops.cli.main import naming_outages
    from vlmops.outages import DVC_REMOTE, Outage, ServiceUnavailable

    refused = 'EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:9/dvc"'
    outage = Outage(DVC_REMOTE, "s3://dvc/store", refused)

    def push() -> int:
        raise ServiceUnavailable(outage) from botocore.exceptions.EndpointConnectionError(endpoint_url="http://x")

    where = "start it (or fix versioning.remote_url in the config, or the endpoint in AWS_ENDPOINT_URL)"
    with pytest.raises(ServiceUnavailable) as by_flow:
        names_unreachable_service(lambda: "retry this flow run")(push)()
    assert str(by_flow.value) == f"{outage}\n{where}, then retry this flow run"
    with pytest.raises(ServiceUnavailable) as by_command:
        naming_outages(lambda args: push(), argparse.Namespace())
    assert str(by_command.value) == f"{outage}\n{where}, then run the command again"
    assert isinstance(by_command.value.__cause__, ServiceUnavailable) and by_command.value.outage == outage
    local = Outage(DVC_REMOTE, "/mnt/dvc", refused)
    assert "\nstart it (or fix versioning.remote_url in the config), then" in str(ServiceUnavailable(local, "rerun"))
    prefect = Outage("Prefect API", "http://127.0.0.1:9/api", "ConnectError: [Errno 111] Connection refused")
    assert str(ServiceUnavailable(prefect, "run the command again")).endswith(
        "\nstart it (or point PREFECT_API_URL at the server), then run the command again"
    )


def test_a_flow_whose_prefect_api_did_not_answer_says_to_start_a_new_run_not_to_retry_it() -> None:
    """Around a flow: an outage of the Prefect API gets the flow's advice for a new run, with the reason a retry would
    be refused (the run's end cannot be recorded either, so Prefect shows it Running); any other server's gets the
    retry advice (`then`), which is not even asked for the Prefect API's."""
    from prefect.client.orchestration import SyncPrefectClient

    from tasks.retry import names_unreachable_service
    from vlmops.outages import ServiceUnavailable

    api = f"{_closed_port_url()}/api"
    asked: list[str] = []

    def then() -> str:
        asked.append("then")
        return "retry this flow run"

    @names_unreachable_service(then, new_run="start a new run")
    def flow_body(server: str) -> None:
        if server == "prefect":
            with SyncPrefectClient(api) as client:
                client.read_flow_runs()
        requests.get(f"{_closed_port_url()}/api/2.0/mlflow/runs/get", timeout=5)

    with pytest.raises(ServiceUnavailable) as prefect:
        flow_body("prefect")
    assert prefect.value.url == api and asked == []
    assert re.search(
        r"\nstart it \(or point PREFECT_API_URL at the server\), then start a new run\. Prefect may still show flow "
        r"run \S+ Running \(its end could not be recorded while the API was away\), and `prefect flow-run retry` "
        r"refuses a run that is not over$",
        str(prefect.value),
    ), str(prefect.value)
    with pytest.raises(ServiceUnavailable) as mlflow:
        flow_body("mlflow")
    assert mlflow.value.service == "MLflow" and asked == ["then"]
    assert str(mlflow.value).endswith("\nstart it (or fix its URL in the config), then retry this flow run")


def test_a_deployments_flow_whose_prefect_api_did_not_answer_is_retried_once_the_server_marks_it_crashed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a server that marks a run whose heartbeats stopped Crashed (VLMOPS_CRASHED_AFTER_S, set by the team stack), a
    deployment's run whose Prefect API went away gets the retry advice (`then`), with when Prefect accepts the retry.
    A run of no deployment there, and any run elsewhere, keeps the new-run advice."""
    from uuid import uuid4

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.context import FlowRunContext

    import tasks.retry
    from tasks.retry import names_unreachable_service, retry_this_flow_run
    from vlmops.outages import ServiceUnavailable

    api = f"{_closed_port_url()}/api"

    @names_unreachable_service(lambda: f"retry it: {retry_this_flow_run(__file__, 'f')}", new_run="start a new run")
    def flow_body() -> None:
        with SyncPrefectClient(api) as client:
            client.read_flow_runs()

    def advice(deployment: bool) -> str:
        run = FlowRun(flow_id=uuid4(), deployment_id=uuid4() if deployment else None)
        # Only the flow run the engine holds: all the advice reads of the context.
        context = FlowRunContext.model_construct(flow_run=run)  # type: ignore[call-arg]
        with context, pytest.raises(ServiceUnavailable) as raised:
            flow_body()
        assert raised.value.url == api
        return (
            str(raised.value)
            .split("\nstart it (or point PREFECT_API_URL at the server), then ", 1)[1]
            .replace(str(run.id), "ID")
        )

    new_run = (
        "start a new run. Prefect may still show flow run ID Running (its end could not be recorded while the API was "
        "away), and `prefect flow-run retry` refuses a run that is not over"
    )
    monkeypatch.setattr(tasks.retry, "CRASHED_AFTER_S", 90)
    assert advice(deployment=True) == (
        "retry it: `prefect flow-run retry ID`. Prefect accepts the retry once it shows the run Crashed: the server marks "
        "a run Crashed 90 s after its last heartbeat"
    )
    assert advice(deployment=False) == new_run  # `vlmops run`: untested there, so the advice that always holds
    monkeypatch.setattr(tasks.retry, "CRASHED_AFTER_S", None)  # the embedded default, or a server without it
    assert advice(deployment=True) == new_run


@pytest.mark.parametrize(("value", "expected"), [("", None), ("90", 90), (" 120 ", 120)])
def test_the_crashed_after_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: int | None
) -> None:
    from tasks.retry import crashed_after_s

    monkeypatch.setenv("VLMOPS_CRASHED_AFTER_S", value)
    assert crashed_after_s() == expected


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "soon"])
def test_a_crashed_after_setting_that_is_not_seconds_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from tasks.retry import crashed_after_s

    monkeypatch.setenv("VLMOPS_CRASHED_AFTER_S", value)
    with pytest.raises(ValueError, match=rf"^VLMOPS_CRASHED_AFTER_S='{re.escape(value)}': must be a whole number"):
        crashed_after_s()
