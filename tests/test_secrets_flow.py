"""Secrets never leave the process: `vlmops run` (the retrain flow on a tiny demo) with known credentials in the
environment and a password inside a config URI; then every file the run wrote (run folders, MLflow store and
artifacts, DVC repository and remote, Prefect's database and results) and everything it printed is scanned for
them. Ordinary output has no third-party warnings either (`vlmops run` is an ordinary command)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_quiet import _noise

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAVLMOPSTESTKEY01",
    "AWS_SECRET_ACCESS_KEY": "vlmops-test-s3-secret-02",
    "HF_TOKEN": "hf_vlmopsTestHubToken03",
    "MODELSCOPE_API_TOKEN": "ms-vlmops-test-token-04",
    "PGPASSWORD": "vlmops-test-db-password-05",
    "MLFLOW_TRACKING_PASSWORD": "vlmops-test-basic-auth-06",
}
URI_PASSWORD = "vlmops-test-uri-password-07"


def test_a_flow_run_writes_no_secret_anywhere(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    config = work / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "pipeline.yaml"),
                "run": {"output_dir": str(work / "outputs")},
                "model": {"cache_dir": str(work / "outputs" / "cache")},
                "data": {"demo": {"num_train": 16, "num_eval": 4, "image_size": 32}},
                "train": {"epochs": 1, "max_steps": 2},
                "eval": {"evaluate_base": False},
                "tracking": {"uri": f"sqlite:///{work}/outputs/mlflow.db"},
                # Not contacted by this flow (no s3:// path), but logged with the config like any other key.
                "storage": {"endpoint_url": f"http://vlmops:{URI_PASSWORD}@127.0.0.1:9"},
            }
        )
    )
    env = {
        **os.environ,
        **SECRETS,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PREFECT_HOME": str(work / "prefect"),  # Prefect's database and persisted results land here
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    }
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "vlmops.cli", "run", "--config", str(config)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "vlmops retrain: done" in done.stdout
    assert not _noise(done.stderr), "\n".join(_noise(done.stderr))

    secrets = [*SECRETS.values(), URI_PASSWORD]
    found = [f"output: {s}" for s in secrets if s in done.stdout or s in done.stderr]
    scanned = 0
    for path in work.rglob("*"):
        if not path.is_file() or path == config:  # the user's own config holds the URI password, as given
            continue
        data = path.read_bytes()
        scanned += 1
        found += [f"{path.relative_to(work)}: {s}" for s in secrets if s.encode() in data]
    assert scanned > 50 and (work / "prefect" / "prefect.db").is_file()
    assert not found, "\n".join(found)
    saved = yaml.safe_load(next((work / "outputs" / "runs").glob("*/config.yaml")).read_text())
    assert saved["storage"]["endpoint_url"] == "http://vlmops:***@127.0.0.1:9"
