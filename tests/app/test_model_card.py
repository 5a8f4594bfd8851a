"""The model card of a registered version: its alias pinned to a version, its aliases and lineage tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmops.app.models import load_page_model, registered_card
from vlmops.app.page import card_markdown
from vlmops.config import TrackingConfig
from vlmops.tracking import Tracker

NAME = "vlmops-app-test"
LINEAGE = {"git_commit": "abc1234", "dataset.hash": "d41d8c", "finetuned_accuracy": "0.9000"}


@pytest.fixture(scope="module")
def registry(chat_model_dir: Path, challenger_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite registry: version 1 (@champion) and version 2 (@challenger), each with lineage tags."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="app"), artifact_root=root / "artifacts")
    for model_dir, alias in ((chat_model_dir, "champion"), (challenger_dir, "challenger")):
        with tracker.run(f"register-{alias}") as run_id:
            tracker.register_model(run_id, model_dir, NAME, alias, tags={**LINEAGE, "mlflow_run_id": run_id})
    return uri


def test_alias_is_pinned_to_its_version_with_aliases_and_lineage(registry: str) -> None:
    card = registered_card(f"models:/{NAME}@champion", registry)
    assert (card.name, card.version, card.aliases) == (NAME, "1", ("champion",))
    assert card.load_ref == f"models:/{NAME}/1"
    assert card.label == f"{NAME} v1 @champion"
    assert {k: card.lineage[k] for k in LINEAGE} == LINEAGE and card.lineage["mlflow_run_id"]
    assert registered_card(f"models:/{NAME}/2", registry).label == f"{NAME} v2 @challenger"


def test_unknown_versions_and_malformed_references(registry: str) -> None:
    with pytest.raises(ValueError, match=rf"models:/{NAME}@nobody: not found in the registry"):
        registered_card(f"models:/{NAME}@nobody", registry)
    with pytest.raises(ValueError, match="write a registered model as models:/NAME@ALIAS"):
        registered_card(f"models:/{NAME}/latest/extra", registry)


def test_page_model_from_the_registry(registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry download cache lives under ~/.cache
    model = load_page_model(f"models:/{NAME}@challenger", None, [f"tracking.uri={registry}"], None)
    assert model.card.label == f"{NAME} v2 @challenger"
    assert model.chat.loaded.path.is_relative_to(tmp_path)
    shown = card_markdown(model.card, model)
    assert f"`models:/{NAME}@challenger` → `models:/{NAME}/2`" in shown
    assert "version **2**" in shown and "**@challenger**" in shown
    # Lineage first (in LINEAGE_FIRST order), then the other tags.
    assert (
        shown.index("git_commit")
        < shown.index("mlflow_run_id")
        < shown.index("dataset.hash")
        < shown.index("finetuned_accuracy")
    )
