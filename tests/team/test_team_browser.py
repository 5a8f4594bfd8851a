"""The team stack's UIs in a real browser (Debian's chromium, headless, Playwright): MLflow behind basic auth
shows the registered model with its alias; the Prefect UI, after its login, shows the finished flow runs and
their artifacts. Screenshots go to the test's tmp_path and to outputs/browser-screenshots/ to look at."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app.test_browser import SCREENSHOTS, chromium_binary, playwright_api
from tests.team.conftest import MODEL_NAME, TeamRun, prefect_api

pytestmark = [pytest.mark.browser, pytest.mark.team, pytest.mark.integration, pytest.mark.timeout(1800)]

UI_TIMEOUT_MS = 120_000  # the MLflow UI's first load is slow on two busy cores


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_binary()  # skips without one, before the stack starts
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


def _shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)
    print(f"screenshot {path}")
    return path


def test_mlflow_ui_shows_the_model_and_its_alias(browser: Any, team_run: TeamRun, tmp_path: Path) -> None:
    stack = team_run.stack
    alias = "champion"
    settings = stack.settings
    refused = browser.new_context()  # no credentials: the server answers 401 and headless chromium gives up
    with pytest.raises(playwright_api.Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
        refused.new_page().goto(stack.mlflow_url)
    refused.close()
    context = browser.new_context(
        viewport={"width": 1400, "height": 900},
        http_credentials={
            "username": settings["MLFLOW_TRACKING_USERNAME"],
            "password": settings["MLFLOW_TRACKING_PASSWORD"],
        },
    )
    page = context.new_page()
    page.goto(f"{stack.mlflow_url}/#/models", wait_until="load", timeout=UI_TIMEOUT_MS)
    page.get_by_text(MODEL_NAME).first.wait_for(timeout=UI_TIMEOUT_MS)
    page.keyboard.press("Escape")  # the "new Model Registry UI" announcement covers the list on a first visit
    _shot(page, tmp_path, "mlflow-models")
    page = context.new_page()  # a fresh load: a hash change on the list page does not reload the route
    page.goto(f"{stack.mlflow_url}/#/models/{MODEL_NAME}", timeout=UI_TIMEOUT_MS)
    page.get_by_text("Version 1").first.wait_for(timeout=UI_TIMEOUT_MS)
    page.get_by_text(f"@ {alias}").first.wait_for(timeout=UI_TIMEOUT_MS)
    assert page.get_by_text("prefect_flow_run_id").count() >= 1
    _shot(page, tmp_path, "mlflow-model-aliases")
    context.close()


def test_prefect_ui_shows_the_flow_runs_and_artifacts(browser: Any, team_run: TeamRun, tmp_path: Path) -> None:
    stack = team_run.stack
    ui = stack.prefect_url.removesuffix("/api")
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{ui}/runs", wait_until="load", timeout=UI_TIMEOUT_MS)
    page.get_by_placeholder("admin:pass").fill(stack.settings["PREFECT_API_AUTH_STRING"])
    page.get_by_role("button", name="Login").click()
    page.get_by_text("Dashboard").first.wait_for(timeout=UI_TIMEOUT_MS)

    runs = {"retrain": team_run.retrain_id, "batch-inference": team_run.batch_id}
    if team_run.promote_id:
        runs["promote"] = team_run.promote_id
    for flow, run_id in runs.items():
        flow_run = prefect_api(stack, "GET", f"/flow_runs/{run_id}")
        page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="load", timeout=UI_TIMEOUT_MS)
        page.get_by_text(flow_run["name"]).first.wait_for(timeout=UI_TIMEOUT_MS)
        page.get_by_text("Completed").first.wait_for(timeout=UI_TIMEOUT_MS)
        _shot(page, tmp_path, f"prefect-{flow}-run")
        # The ones a person reads (the UI lists no `result` records of persisted results).
        artifacts = [
            a
            for a in prefect_api(stack, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
            if a["type"] not in (None, "result")
        ]
        if flow != "retrain":  # the retrain flow's summary and samples artifacts come with the promotion work
            assert artifacts, f"no artifacts on the {flow} flow run"
        page.get_by_text("Artifacts", exact=True).first.click()
        for artifact in artifacts:
            label = re.compile(f"^{artifact['type']}$", re.IGNORECASE)  # the card's heading, e.g. PROGRESS
            page.get_by_text(label).first.wait_for(timeout=UI_TIMEOUT_MS)
            shown = artifact["key"] or artifact["description"]
            if shown:
                page.get_by_text(shown).first.wait_for(timeout=UI_TIMEOUT_MS)
        _shot(page, tmp_path, f"prefect-{flow}-artifacts")
        print(f"{flow} flow run {flow_run['name']}: {[a['type'] for a in artifacts]} artifacts shown")
