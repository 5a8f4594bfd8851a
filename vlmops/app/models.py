"""The models a chat page serves: each loaded once, with the card the page shows above its answers.

A registered model (`models:/NAME@ALIAS`) is pinned to the version its alias points at when the page starts:
the card and the weights are that version even if `champion` moves while the page is open (restart the
page to follow the alias). Its card lists the version's aliases and tags: the lineage `vlmops run` records
(git commit, MLflow and Prefect run ids, dataset and DVC hashes) and its evaluation metrics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from vlmops.config import InferConfig
from vlmops.infer.chat import ChatModel
from vlmops.infer.resolve import (
    REGISTRY_SCHEME,
    RETRAIN_MODEL_DIR,
    ModelSource,
    config_for_model,
    registered_version,
    saved_run_folder,
    with_saved_settings,
)
from vlmops.train.rundir import run_config

# `models:/NAME@ALIAS` or `models:/NAME/VERSION`; anything else under models:/ is left to resolve_model_ref,
# which explains the accepted forms.


@dataclass(frozen=True)
class ModelCard:
    """What the page says about a model: where it came from, which version, and its lineage."""

    ref: str
    """What the user passed (`--model` / `--compare`)."""
    load_ref: str
    """What is loaded: `ref`, with a registry alias pinned to its version number."""
    name: str
    version: str | None = None
    aliases: tuple[str, ...] = ()
    lineage: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """One line for the answer panel: `NAME v3 @champion`."""
        version = f" v{self.version}" if self.version else ""
        return self.name + version + "".join(f" @{alias}" for alias in self.aliases)


@dataclass
class PageModel:
    """A loaded model, its card, and the prompt budget the page enforces."""

    chat: ChatModel
    card: ModelCard
    max_length: int
    """`data.max_length`: the longest conversation (prompt, image tokens and answer) the page accepts (the model's
    saved one where the config leaves it unset)."""
    defaults: InferConfig
    """The generation settings the page starts with (the run's or the config's `infer` section)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """A ChatModel answers one turn at a time; visitors of the page take turns."""


def load_page_model(ref: str, config_path: str | None, overrides: list[str], system: str | None) -> PageModel:
    """Load `ref` (checkpoint or run folder, `models:/NAME@ALIAS`, catalog name) as `vlmops infer` does.

    A run folder (a retrain flow run's too: its merged/ model's) brings its whole saved config unless `config_path`
    is given; `overrides` apply on top either way. Any model that comes with a saved config (a run folder, a
    registered version of one) brings its system prompt, generation settings and `data.max_length` wherever
    `config_path` and `overrides` leave them unset (`with_saved_settings`).
    """
    config = config_for_model(run_config(saved_run_folder(ref), config_path, overrides), ref, overrides)
    card = registered_card(ref, config.tracking.uri) if ref.startswith(REGISTRY_SCHEME) else None
    chat = ChatModel.from_config(card.load_ref if card else ref, config, system=system)
    config = with_saved_settings(config, chat.source)  # as `from_config` took them: here for data.max_length
    return PageModel(chat, card or local_card(ref, chat.source), config.data.max_length, chat.infer_cfg)


def registered_card(ref: str, tracking_uri: str | None) -> ModelCard:
    """The card of a registered version, with an alias resolved to the version it points at now.

    Raises:
        ValueError: a malformed `models:/` URI, or a name, version or alias the registry does not know.
    """
    found = registered_version(ref, tracking_uri)
    name, version = found.name, found.version
    return ModelCard(
        ref=ref,
        load_ref=f"{REGISTRY_SCHEME}{name}/{version.version}",
        name=name,
        version=str(version.version),
        aliases=tuple(sorted(version.aliases or ())),
        lineage={key: str(value) for key, value in sorted((version.tags or {}).items())},
    )


def local_card(ref: str, source: ModelSource) -> ModelCard:
    """The card of a folder or catalog model: its name, and for a training run what it was trained from."""
    run = source.run
    if run is None:
        lineage = {"checkpoint": str(source.checkpoint)}
        if source.adapter is not None:
            lineage["adapter"] = str(source.adapter)
        return ModelCard(ref, ref, Path(ref).name or ref, lineage=lineage)
    lineage = {
        "run": str(run.root),
        "mode": run.info.mode,
        "base_model": run.info.base_model,
        "dataset.hash": run.info.dataset_hash,
    }
    if run.info.merged_from:
        lineage["merged_from"] = run.info.merged_from
    # Every retrain flow run keeps its model in merged/: named by its run, two side by side are told apart.
    name = f"{run.root.parent.name}/{run.root.name}" if run.root.name == RETRAIN_MODEL_DIR else run.root.name
    return ModelCard(ref, ref, name, lineage=lineage)
