"""`vlmops config --show`, the command error messages point to, through the real entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmops.cli.main import main
from vlmops.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_config_show_prints_every_key_resolved(capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = str(ROOT / "pipeline.yaml")
    assert main(["config", "--show", "--config", pipeline, "--set", "train.epochs=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 7
    # every key of the schema, not only the ones the file sets
    assert set(shown) == set(PipelineConfig.model_fields)
    assert PipelineConfig.model_validate(shown) == load_config(pipeline, ["train.epochs=7"])
    # plain `vlmops config` prints the same
    assert main(["config", "--config", pipeline, "--set", "train.epochs=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == shown


def test_an_unknown_key_points_to_config_show_which_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  epochz: 1\n")
    assert main(["config", "--show", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.epochz" in err and "`vlmops config --show` prints every valid key" in err


def test_run_refuses_a_credential_before_any_flow_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vlmops run` checks the config before Prefect records the overrides as the flow run's parameters."""
    uri = "http://alice:hunter2pw@127.0.0.1:9/"
    assert main(["run", "--config", str(ROOT / "pipeline.yaml"), "--set", f"tracking.uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert "override tracking.uri: holds a password" in err and "hunter2pw" not in err
