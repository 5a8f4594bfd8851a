"""The model card of a registered version: its alias pinned to a version, its aliases and lineage tags."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vlmops.app.models import load_page_model, registered_card
from vlmops.app.page import card_markdown
from vlmops.config import TrackingConfig, dump_config, load_config
from vlmops.infer.resolve import RETRAIN_MODEL_DIR
from vlmops.tracking import Tracker
from vlmops.train.rundir import CONFIG_FILE, RunInfo

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


def retrain_run(run: Path, model_dir: Path, saved: list[str]) -> Path:
    """A retrain flow run folder (outputs/runs/<run>) around its merged/ model: `model_dir` with a saved config."""
    merged = run / RETRAIN_MODEL_DIR
    shutil.copytree(model_dir, merged)
    (merged / CONFIG_FILE).write_text(dump_config(load_config(None, saved)))
    RunInfo(str(model_dir), str(run), "test", "full", merged_from=str(run / "final")).write(merged)
    return run


def test_a_retrain_flow_run_folder_brings_its_merged_models_saved_config(chat_model_dir: Path, tmp_path: Path) -> None:
    """`vlmops app --model outputs/runs/<run>` (the README's example) serves the run's merged/ model with the config
    saved beside it (system prompt, generation settings, max_length), as `--model outputs/runs/<run>/merged` and
    `ChatModel.load("outputs/runs/<run>")` take it; it used the built-in defaults (64 new tokens, the released system
    prompt), which the model was not trained with."""
    saved = ["model.system_prompt=You answer in colours.", "infer.max_new_tokens=5", "data.max_length=1500"]
    run = retrain_run(tmp_path / "runs" / "r1", chat_model_dir, saved)
    merged = run / RETRAIN_MODEL_DIR
    for ref in (run, merged):
        model = load_page_model(str(ref), None, [], None)
        assert model.chat.system_prompt == "You answer in colours."
        assert (model.defaults.max_new_tokens, model.max_length) == (5, 1500)
    assert load_page_model(str(run), None, ["infer.max_new_tokens=7"], None).defaults.max_new_tokens == 7


def test_a_registered_version_brings_its_saved_settings(
    registry: str, chat_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vlmops app --model models:/...` (and `vlmops infer`, `ChatModel.from_config`) of a version the retrain flow
    registered, its merged model with the config saved beside it, starts with that config's generation settings and
    system prompt, as `ChatModel.load` does, and its `data.max_length`, as a run folder's; `--set` still wins. The page
    started at the built-in defaults (64 new tokens, temperature 0, then a max_length of 2048)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry download cache lives under ~/.cache
    saved = ["model.system_prompt=You answer in colours.", "infer.max_new_tokens=5", "infer.temperature=0.5"]
    merged = retrain_run(tmp_path / "runs" / "r1", chat_model_dir, [*saved, "data.max_length=1500"]) / RETRAIN_MODEL_DIR
    tracker = Tracker(TrackingConfig(uri=registry, experiment="app"))
    with tracker.run("register-saved") as run_id:
        tracker.register_model(run_id, merged, f"{NAME}-saved", "champion")
    ref = f"models:/{NAME}-saved@champion"
    model = load_page_model(ref, None, [f"tracking.uri={registry}"], None)
    assert (model.defaults.max_new_tokens, model.defaults.temperature) == (5, 0.5)
    assert model.chat.system_prompt == "You answer in colours."
    assert model.max_length == 1500  # as a run folder's: the page took the built-in 2048
    given = load_page_model(
        ref, None, [f"tracking.uri={registry}", "infer.max_new_tokens=7", "data.max_length=900"], None
    )
    assert (given.defaults.max_new_tokens, given.defaults.temperature, given.max_length) == (7, 0.5, 900)


def test_retrain_flow_runs_side_by_side_are_told_apart(chat_model_dir: Path, tmp_path: Path) -> None:
    """Each panel is labelled with its run (`r1/merged`): both were labelled `merged`, the folder every retrain flow run
    keeps its model in, so `--model outputs/runs/r1 --compare outputs/runs/r2` showed two answers under one name."""
    cards = [
        load_page_model(str(retrain_run(tmp_path / name, chat_model_dir, [])), None, [], None).card
        for name in ("r1", "r2")
    ]
    assert [card.label for card in cards] == ["r1/merged", "r2/merged"]


@pytest.mark.parametrize(
    "saved",
    [
        ["infer.top_p=0.01", "infer.temperature=0.7"],
        ["infer.temperature=3.5", "infer.max_new_tokens=6000"],
    ],
)
def test_the_sliders_hold_the_models_own_settings(chat_model_dir: Path, saved: list[str]) -> None:
    """A run whose settings lie outside the page's fixed slider ranges (top-p 0.01, temperature 3.5, 6,000 new
    tokens) started with sliders out of range: Gradio refuses a value outside a slider's range on every turn (and the
    browser shows it clamped), so the page could not be used with the settings the run was made with."""
    import gradio as gr

    from vlmops.app.page import build_page

    model = load_page_model(str(chat_model_dir), None, saved, None)
    page = build_page([model])
    sliders = {b.label: b for b in page.blocks.values() if isinstance(b, gr.Slider)}
    wanted = {
        "max new tokens": model.defaults.max_new_tokens,
        "temperature (0: greedy)": model.defaults.temperature,
        "top-p (sampling only)": model.defaults.top_p,
    }
    assert sliders.keys() == wanted.keys()
    for label, value in wanted.items():
        slider = sliders[label]
        assert slider.minimum <= slider.value == value <= slider.maximum, label
        assert slider.preprocess(value) == value  # the value the page starts with is one a turn may send
