"""A flow run's own folder (flows/run_folder.py): a retry of the flow run finds the one its earlier try made, a new
flow run gets its own, and a retry that reads another config is refused there."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.run_folder import flow_run_folder, write_run_config
from vlmops.errors import UserInputError


def test_a_retry_finds_its_flow_runs_folder_and_a_new_flow_run_gets_its_own(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first, other = flow_run_folder(runs, "flow-run-1"), flow_run_folder(runs, "flow-run-2")
    assert first != other
    assert (flow_run_folder(runs, "flow-run-1"), flow_run_folder(runs, "flow-run-2")) == (first, other)
    assert flow_run_folder(runs, "flow-run-3") not in (first, other) and len(list(runs.iterdir())) == 3


def test_a_retry_finds_the_folder_with_its_prefix_only(tmp_path: Path) -> None:
    """promote's work folder is per challenger: a retry that finds another challenger (@challenger moved) gets a folder
    of its own, and one that finds the earlier try's challenger again goes on in that try's."""
    promotions = tmp_path / "promotions"
    v2 = flow_run_folder(promotions, "flow-run-1", "model-v2-")
    v3 = flow_run_folder(promotions, "flow-run-1", "model-v3-")
    assert v2.name.startswith("model-v2-") and v3.name.startswith("model-v3-")
    assert flow_run_folder(promotions, "flow-run-1", "model-v2-") == v2
    assert flow_run_folder(promotions, "flow-run-1", "model-v3-") == v3
    assert flow_run_folder(promotions, "flow-run-2", "model-v2-") not in (v2, v3)


def test_a_retry_that_reads_another_config_is_refused(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    write_run_config(config_file, "train:\n  epochs: 10\n")
    write_run_config(config_file, "train:\n  epochs: 10\n")  # the same config: the retry goes on
    with pytest.raises(UserInputError, match="start a new run instead of retrying this one"):
        write_run_config(config_file, "train:\n  epochs: 2\n")
    assert config_file.read_text() == "train:\n  epochs: 10\n"
