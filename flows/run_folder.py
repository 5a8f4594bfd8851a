"""A flow run's own folder, where its steps write: retrain's run folder (`run.output_dir`/runs), promote's work folder
(`run.output_dir`/promotions). A retry of the flow run (`prefect flow-run retry`, a flow's `retries`) goes on in the one
its earlier try made, where the results of the steps that finished point (`tasks.caching.within_flow_run`) and its
batch jobs' finished shards lie; a new flow run gets a new one.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from vlmops.errors import UserInputError

FLOW_RUN_FILE = "prefect_flow_run_id"
"""In a flow run's folder: the id of the flow run it belongs to, by which a retry of that flow run finds it."""


def flow_run_folder(parent: Path, flow_run_id: str, prefix: str = "") -> Path:
    """The flow run's folder under `parent` whose name starts with `prefix`: the one an earlier try of the flow run made,
    else a fresh one, named `prefix`, the time and a random suffix. Runs started in the same second on one output folder
    (two `vlmops run` at once) each get their own: mkdir is the atomic claim, a taken name draws again.

    `prefix` tells apart what one flow run may do in two tries (promote's challenger: @challenger may name a newer
    version when the retry reads it), each in its own folder."""
    if flow_run_id:  # a new flow run's id is in no folder yet
        for marker in sorted(parent.glob(f"*/{FLOW_RUN_FILE}")):
            if marker.parent.name.startswith(prefix) and marker.read_text().strip() == flow_run_id:
                return marker.parent
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = parent / (prefix + time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2))
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        (folder / FLOW_RUN_FILE).write_text(f"{flow_run_id}\n")
        return folder


def write_run_config(config_file: Path, text: str) -> None:
    """The flow run's config.yaml; a retry's must be its earlier try's: the folder's steps and batch jobs were made with
    that one (pipeline.yaml edited between the tries is another run).

    Raises:
        UserInputError: the folder holds another config.
    """
    if config_file.is_file() and config_file.read_text() != text:
        raise UserInputError(
            f"this flow run's folder {config_file.parent} was started with another config than the one its retry reads "
            f"now (compare {config_file} with the config and overrides): start a new run instead of retrying this one"
        )
    config_file.write_text(text)
