"""`python -m infra.server_objects`, what every stack runs once its Prefect server answers (infra/local after it starts
the server, compose's `prefect-setup`, the k8s Job): on the tests' Prefect server, twice; against no server; with the
wrong credentials; with bad settings."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.local.seaweedfs import free_ports
from infra.server_objects import (
    GPU_LIMIT,
    RESULTS_BLOCK,
    RESULTS_BLOCK_TYPE,
    ZOMBIE_AUTOMATION,
    ServerObjects,
    main,
)


def run(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """The entry point as compose and k8s run it: settings from the environment (no .env of this checkout)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    empty = tmp_path / "empty.env"
    empty.touch()
    return main(["--env-file", str(empty), *args])


@pytest.mark.integration
def test_twice_on_a_server_one_limit_one_block_one_automation(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first run makes the three objects; the second keeps the limit (drained to 0 in between: its slots are not
    reset, the message says how to apply GPU_SLOTS) and the block, and replaces the automation with the new window."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.events.schemas.automations import EventTrigger
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value())
    env = {
        "PREFECT_API_URL": api,
        "GPU_SLOTS": "2",
        "VLMOPS_BUCKET": "team-bucket",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "VLMOPS_CRASHED_AFTER_S": "90",
    }
    try:
        assert run(env, tmp_path, monkeypatch) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"concurrency limit {GPU_LIMIT}: created, 2 slots",
            f"result storage block {RESULTS_BLOCK_TYPE}/{RESULTS_BLOCK}: created, s3://team-bucket/prefect-results",
            f"automation {ZOMBIE_AUTOMATION}: created",
            f"the Prefect server at {api} holds the team stack's objects",
        ]
        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=0))
        assert run({**env, "VLMOPS_CRASHED_AFTER_S": "120"}, tmp_path, monkeypatch) == 0
        assert capsys.readouterr().out.splitlines()[:3] == [
            f"concurrency limit {GPU_LIMIT}: kept, 0 slots, not GPU_SLOTS=2 (0 drains the pool: keep it, or apply "
            f"GPU_SLOTS with `prefect gcl update {GPU_LIMIT} --limit 2`)",
            f"result storage block {RESULTS_BLOCK_TYPE}/{RESULTS_BLOCK}: kept, s3://team-bucket/prefect-results",
            f"automation {ZOMBIE_AUTOMATION}: replaced",
        ]
        with get_client(sync_client=True) as client:
            limits = [limit for limit in client.read_global_concurrency_limits(limit=200) if limit.name == GPU_LIMIT]
            assert [limit.limit for limit in limits] == [0]
            blocks = [b for b in client.read_block_documents(limit=200) if b.name == RESULTS_BLOCK]
            assert [b.data["basepath"] for b in blocks] == ["s3://team-bucket/prefect-results"]
            (automation,) = client.read_automations_by_name(ZOMBIE_AUTOMATION)
            assert isinstance(automation.trigger, EventTrigger)
            assert automation.trigger.within == timedelta(seconds=120)
    finally:
        # The harness serves the whole session: the flow tests after this one expect no `gpu` limit there.
        with get_client(sync_client=True) as client:
            for limit in client.read_global_concurrency_limits(limit=200):
                if limit.name == GPU_LIMIT:
                    client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
            for block in client.read_block_documents(limit=200):
                if block.name == RESULTS_BLOCK:
                    client.delete_block_document(block.id)
            for automation in client.read_automations_by_name(ZOMBIE_AUTOMATION):
                client.delete_automation(automation.id)


def test_no_server_is_an_error_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = free_ports(1)
    api = f"http://127.0.0.1:{port}/api"
    started = time.monotonic()
    env = {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": "admin:x"}
    assert run(env, tmp_path, monkeypatch, "--timeout", "2") == 1
    assert 2 <= time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith(f"error: the Prefect server at {api} did not answer in 2 s (last: "), err
    assert "Connection refused" in err
    assert err.endswith("start it, or point PREFECT_API_URL at it, then run `python -m infra.server_objects` again\n")


class Unauthorized(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """An HTTP server that answers 401 to everything, as the Prefect server does to the wrong auth string."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def test_the_wrong_credentials_are_an_error_at_once(
    refusing_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"PREFECT_API_URL": refusing_server, "PREFECT_API_AUTH_STRING": "admin:wrong"}
    started = time.monotonic()
    assert run(env, tmp_path, monkeypatch, "--timeout", "60") == 1
    assert time.monotonic() - started < 10  # no waiting for credentials that will not change
    assert capsys.readouterr().err == (
        f"error: the Prefect server at {refusing_server} refuses PREFECT_API_AUTH_STRING (401 Unauthorized): set it to "
        "the server's PREFECT_SERVER_API_AUTH_STRING (USER:PASSWORD)\n"
    )


def test_every_bad_setting_is_named_at_once() -> None:
    env = {"GPU_SLOTS": "-1", "VLMOPS_BUCKET": "", "PREFECT_API_AUTH_STRING": "admin", "VLMOPS_CRASHED_AFTER_S": "30"}
    with pytest.raises(ValueError) as raised:
        ServerObjects.from_env(env)
    assert str(raised.value).split("; ") == [
        "GPU_SLOTS='-1': must be a whole number of slots (0 drains the pool)",
        "VLMOPS_BUCKET is empty: the bucket of the stack's S3 (.env.example: vlmops)",
        "VLMOPS_CRASHED_AFTER_S=30 must exceed PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30: a run is marked Crashed after "
        "that long without a heartbeat (Prefect's recipe: 3 heartbeats, 90)",
        "PREFECT_API_URL is not set: the Prefect server's API, e.g. http://127.0.0.1:4200/api",
        "PREFECT_API_AUTH_STRING must be USER:PASSWORD (basic auth of the Prefect server)",
    ]
